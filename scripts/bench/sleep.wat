;; A WASI command that sleeps an hour (poll_oneoff on a relative monotonic clock) and exits:
;; the long-running wasm task of scripts/measure-runtimes.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; One subscription at 0 (48 bytes): userdata 0, tag 0 (clock), clock id 1 (monotonic)
    ;; at 16, timeout in ns at 24, precision at 32, flags 0 (relative) at 40.
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (i64.store (i32.const 32) (i64.const 1000000))
    (i32.store16 (i32.const 40) (i32.const 0))
    (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
