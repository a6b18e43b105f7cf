;; One piece of a Monte Carlo estimate of pi, as a WASI preview 1 command: `pi.wasm INDEX DARTS`
;; throws DARTS darts with a xorshift64* generator seeded by INDEX, and prints
;; "piece INDEX: INSIDE of DARTS darts inside". `make demo` runs 12 pieces as an indexed Job on
;; darkcore-wasm (examples/pi-job.yaml); the e2e tests run it too and check every count.
(module
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  ;; 0..63 scratch; 64..: argv pointers; 1024..: argv strings; 3072..3103 digits;
  ;; 4096..: the line printed.
  (memory (export "memory") 1)
  (data (i32.const 256) "piece ")
  (data (i32.const 272) ": ")
  (data (i32.const 288) " of ")
  (data (i32.const 304) " darts inside\0a")
  (global $out (mut i32) (i32.const 4096))
  (global $seed (mut i64) (i64.const 1))

  ;; Appends len bytes at ptr to the line.
  (func $put (param $ptr i32) (param $len i32)
    (memory.copy (global.get $out) (local.get $ptr) (local.get $len))
    (global.set $out (i32.add (global.get $out) (local.get $len))))

  ;; Appends v in decimal.
  (func $put_number (param $v i64) (local $at i32)
    (local.set $at (i32.const 3104))
    (loop $digit
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i64.store8 (local.get $at) (i64.add (i64.const 48) (i64.rem_u (local.get $v) (i64.const 10))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $v) (i64.const 0))))
    (call $put (local.get $at) (i32.sub (i32.const 3104) (local.get $at))))

  ;; The decimal number at p (up to its first non-digit).
  (func $parse (param $p i32) (result i64) (local $n i64) (local $digit i32)
    (block $done
      (loop $next
        (local.set $digit (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
        (br_if $done (i32.ge_u (local.get $digit) (i32.const 10)))
        (local.set $n (i64.add (i64.mul (local.get $n) (i64.const 10)) (i64.extend_i32_u (local.get $digit))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $next)))
    (local.get $n))

  ;; A uniform double in [0, 1): xorshift64*, top 53 bits.
  (func $uniform (result f64) (local $s i64)
    (local.set $s (global.get $seed))
    (local.set $s (i64.xor (local.get $s) (i64.shr_u (local.get $s) (i64.const 12))))
    (local.set $s (i64.xor (local.get $s) (i64.shl (local.get $s) (i64.const 25))))
    (local.set $s (i64.xor (local.get $s) (i64.shr_u (local.get $s) (i64.const 27))))
    (global.set $seed (local.get $s))
    (f64.mul
      (f64.convert_i64_u (i64.shr_u (i64.mul (local.get $s) (i64.const 2685821657736338717)) (i64.const 11)))
      (f64.const 0x1p-53)))

  (func (export "_start")
    (local $index i64) (local $darts i64) (local $thrown i64) (local $inside i64) (local $x f64) (local $y f64)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_get (i32.const 64) (i32.const 1024)))
    (local.set $index (call $parse (i32.load (i32.const 68))))
    (local.set $darts (call $parse (i32.load (i32.const 72))))
    (global.set $seed
      (i64.add (i64.mul (i64.add (local.get $index) (i64.const 1)) (i64.const 0x9E3779B97F4A7C15)) (i64.const 1)))
    (block $done
      (loop $throw
        (br_if $done (i64.ge_u (local.get $thrown) (local.get $darts)))
        (local.set $x (call $uniform))
        (local.set $y (call $uniform))
        (if (f64.le (f64.add (f64.mul (local.get $x) (local.get $x)) (f64.mul (local.get $y) (local.get $y))) (f64.const 1))
          (then (local.set $inside (i64.add (local.get $inside) (i64.const 1)))))
        (local.set $thrown (i64.add (local.get $thrown) (i64.const 1)))
        (br $throw)))
    (call $put (i32.const 256) (i32.const 6))
    (call $put_number (local.get $index))
    (call $put (i32.const 272) (i32.const 2))
    (call $put_number (local.get $inside))
    (call $put (i32.const 288) (i32.const 4))
    (call $put_number (local.get $darts))
    (call $put (i32.const 304) (i32.const 14))
    (i32.store (i32.const 16) (i32.const 4096))
    (i32.store (i32.const 20) (i32.sub (global.get $out) (i32.const 4096)))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
