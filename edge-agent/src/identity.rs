//! The device identity that `join` earns and `run` uses, kept in the state dir: the private
//! key and certificate (mode 0600 in a 0700 directory), the CA, and where and who we are.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where identity and status live when `--state-dir` is not given.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/darkcore";

const KEY_FILE: &str = "device.key";
const CERT_FILE: &str = "device.crt";
const CA_FILE: &str = "ca.crt";
const DEVICE_FILE: &str = "device.toml";

/// What the state dir holds after a successful join.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    pub device: DeviceRecord,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

// The private key never reaches a log through Debug.
impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device", &self.device)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub device_id: String,
    pub pool: String,
    /// The gateway URL given to `join`; `run` dials it.
    pub server: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "this device has not joined a pool yet ({dir} holds no identity): run `darkcore-agent join --server URL --token TOKEN` first"
    )]
    NotJoined { dir: PathBuf },
    #[error(
        "this device already joined pool {pool} as {device_id} ({dir}): to join again, stop the agent and remove that directory, or pass another --state-dir"
    )]
    AlreadyJoined {
        dir: PathBuf,
        device_id: String,
        pool: String,
    },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}; remove the state dir and join again")]
    Damaged { path: PathBuf, reason: String },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io {
        action,
        path,
        source,
    }
}

impl Identity {
    /// Reads the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let device_path = dir.join(DEVICE_FILE);
        if !device_path.exists() {
            return Err(IdentityError::NotJoined {
                dir: dir.to_path_buf(),
            });
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(io("reading", &path))
        };
        let device: DeviceRecord =
            toml::from_str(&read(DEVICE_FILE)?).map_err(|e| IdentityError::Damaged {
                path: device_path,
                reason: e.to_string(),
            })?;
        Ok(Identity {
            device,
            key_pem: read(KEY_FILE)?,
            cert_pem: read(CERT_FILE)?,
            ca_pem: read(CA_FILE)?,
        })
    }

    /// Refuses to overwrite an existing identity.
    pub fn ensure_absent(dir: &Path) -> Result<(), IdentityError> {
        match Identity::load(dir) {
            Err(IdentityError::NotJoined { .. }) => Ok(()),
            Ok(existing) => Err(IdentityError::AlreadyJoined {
                dir: dir.to_path_buf(),
                device_id: existing.device.device_id,
                pool: existing.device.pool,
            }),
            Err(other) => Err(other),
        }
    }

    /// Writes the identity into `dir` (created 0700), private files 0600. The device record
    /// is written last, so a join cut short leaves no half identity behind.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io("restricting", dir))?;
        let record = toml::to_string(&self.device).map_err(|e| IdentityError::Damaged {
            path: dir.join(DEVICE_FILE),
            reason: e.to_string(),
        })?;
        write_private(&dir.join(KEY_FILE), &self.key_pem)?;
        write_private(&dir.join(CERT_FILE), &self.cert_pem)?;
        write_private(&dir.join(CA_FILE), &self.ca_pem)?;
        write_private(&dir.join(DEVICE_FILE), &record)
    }
}

/// A renewed certificate from the operator (see `CertificateRenewed`): stored in place of the
/// current one, to be presented from the next connection on, once it is checked to be a
/// certificate for this device's own key (a wrong one would lock the device out).
pub fn store_renewed(dir: &Path, cert_pem: &str) -> Result<(), IdentityError> {
    let identity = Identity::load(dir)?;
    let path = dir.join(CERT_FILE);
    let damaged = |reason: String| IdentityError::Damaged {
        path: path.clone(),
        reason,
    };
    let cert = pem::parse(cert_pem)
        .map_err(|e| damaged(format!("the renewed certificate is not PEM: {e}")))?;
    let key = pem::parse(&identity.key_pem)
        .map_err(|e| damaged(format!("the device key is not PEM: {e}")))?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.into_contents())
        .map_err(|e| damaged(format!("the device key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| damaged(format!("the device key: {e}")))?;
    rustls::sign::CertifiedKey::new(
        vec![rustls::pki_types::CertificateDer::from(
            cert.into_contents(),
        )],
        signing,
    )
    .keys_match()
    .map_err(|e| {
        damaged(format!(
            "the renewed certificate is not for this device's key: {e}"
        ))
    })?;
    write_private(&path, cert_pem)
}

/// Writes `text` to `path` with mode 0600, through a temporary file and a rename.
pub fn write_private(path: &Path, text: &str) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            device: DeviceRecord {
                device_id: "dev-0123456789ab".into(),
                pool: "lab".into(),
                server: "https://gw:7443".into(),
            },
            key_pem: "-----BEGIN PRIVATE KEY-----\nsecret\n".into(),
            cert_pem: "cert".into(),
            ca_pem: "ca".into(),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        crate::fresh_test_dir(name)
    }

    #[test]
    fn an_identity_round_trips_with_private_modes() {
        let dir = temp_dir("identity");
        identity().save(&dir).unwrap();
        assert_eq!(Identity::load(&dir).unwrap(), identity());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for file in [KEY_FILE, CERT_FILE, CA_FILE, DEVICE_FILE] {
            assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_empty_dir_says_to_join_and_a_joined_one_is_not_overwritten() {
        let dir = temp_dir("joined");
        let err = Identity::load(&dir).unwrap_err().to_string();
        assert!(err.contains("darkcore-agent join"), "{err}");
        Identity::ensure_absent(&dir).unwrap();
        identity().save(&dir).unwrap();
        let err = Identity::ensure_absent(&dir).unwrap_err().to_string();
        assert!(err.contains("already joined pool lab"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_renewed_certificate_is_stored_only_when_it_is_for_this_devices_key() {
        let dir = temp_dir("renewed");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert_for = |key: &rcgen::KeyPair| {
            rcgen::CertificateParams::new(vec!["dev".to_string()])
                .unwrap()
                .self_signed(key)
                .unwrap()
                .pem()
        };
        let mine = Identity {
            key_pem: key.serialize_pem(),
            cert_pem: cert_for(&key),
            ..identity()
        };
        mine.save(&dir).unwrap();
        let renewed = cert_for(&key);
        store_renewed(&dir, &renewed).unwrap();
        assert_eq!(Identity::load(&dir).unwrap().cert_pem, renewed);
        let other = cert_for(&rcgen::KeyPair::generate().unwrap());
        let err = store_renewed(&dir, &other).unwrap_err().to_string();
        assert!(err.contains("not for this device's key"), "{err}");
        assert!(store_renewed(&dir, "garbage").is_err());
        assert_eq!(
            Identity::load(&dir).unwrap().cert_pem,
            renewed,
            "a refused certificate changes nothing"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_hides_the_key() {
        assert!(!format!("{:?}", identity()).contains("secret"));
    }
}
