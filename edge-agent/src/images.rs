//! Images on the device: pulled by reference from OCI registries (an index resolved to this
//! device's platform, or to WASI for WebAssembly), every blob checked against its digest, kept
//! in one cache shared by all tasks, bounded in size and evicted least recently used first.
//!
//! Layout under the state dir: `images/blobs/sha256/<hex>` holds verified blobs (a download in
//! progress is `<hex>.partial`, resumed after a network blip); `images/refs/<hash of the
//! reference>.json` records what a reference last resolved to, for `IfNotPresent` and `Never`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use darkcore_proto::agent::v1::RegistryCredential;
use darkcore_proto::agent::v1::container::PullPolicy;
use futures::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{ImageIndexEntry, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::digest::{sha256_hex, sha256_read};

/// Attempts per blob before a pull fails; each resumes where the last one stopped.
const BLOB_ATTEMPTS: u32 = 4;

/// An image on this device, ready for a runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub reference: String,
    /// The manifest's digest: the container status's imageID.
    pub digest: String,
    pub config_media_type: String,
    /// The image config (JSON), as the registry served it.
    pub config: String,
    pub layers: Vec<Layer>,
    /// Who may use this copy without asking the registry again: `None` when it was pulled
    /// anonymously (anyone), else the fingerprints of the credentials that pulled it.
    #[serde(default)]
    pub granted_to: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// Why an image could not be had, in Kubernetes' words: `reason` is what the container's
/// waiting state shows.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image name {reference:?}: {why}")]
    InvalidName { reference: String, why: String },
    #[error("image {0:?} is not present on the device and its imagePullPolicy is Never")]
    NotPresent(String),
    #[error("pulling {reference}: {message}")]
    Registry { reference: String, message: String },
    #[error("storing {reference}: {source}")]
    Disk {
        reference: String,
        source: std::io::Error,
    },
}

impl PullError {
    pub fn reason(&self) -> &'static str {
        match self {
            PullError::InvalidName { .. } => "InvalidImageName",
            PullError::NotPresent(_) => "ErrImageNeverPull",
            PullError::Registry { .. } | PullError::Disk { .. } => "ErrImagePull",
        }
    }

    /// Whether trying again could help (a bad name or policy Never will not change).
    pub fn retryable(&self) -> bool {
        matches!(self, PullError::Registry { .. } | PullError::Disk { .. })
    }
}

/// The device's image cache, and how it reaches registries.
pub struct ImageStore {
    root: PathBuf,
    /// Bytes of blobs kept; beyond it, the least recently used go first.
    bound_bytes: u64,
    /// Registries (host:port) spoken to over plain HTTP.
    insecure: Vec<String>,
    /// One lock per reference or blob being pulled: two pods of one image wait for one pull.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Picks this device's entry of an image index, else a WASI one (WebAssembly runs anywhere).
fn platform_resolver(entries: &[ImageIndexEntry]) -> Option<String> {
    let platform = |e: &&ImageIndexEntry| {
        e.platform
            .as_ref()
            .map(|p| (p.os.to_string(), p.architecture.to_string()))
    };
    let here = (
        std::env::consts::OS.to_string(),
        crate::capabilities::kubernetes_arch(std::env::consts::ARCH).to_string(),
    );
    entries
        .iter()
        .find(|e| platform(e).as_ref() == Some(&here))
        .or_else(|| {
            entries
                .iter()
                .find(|e| platform(e).is_some_and(|(_, arch)| arch == "wasm"))
        })
        .map(|e| e.digest.clone())
}

/// Parses an image reference as the kubelet does: a repository must be lowercase.
fn parse_reference(reference: &str) -> Result<Reference, PullError> {
    let invalid = |why: String| PullError::InvalidName {
        reference: reference.into(),
        why,
    };
    let parsed: Reference = reference.parse().map_err(|e| invalid(format!("{e}")))?;
    if parsed.repository().chars().any(|c| c.is_ascii_uppercase()) {
        return Err(invalid("repository name must be lowercase".into()));
    }
    Ok(parsed)
}

fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// The sha256 of a file, read in small pieces: a layer may be larger than a small device's
/// spare memory.
fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_read(std::fs::File::open(path)?)
}

/// The credentials of `credentials` for the reference's registry, if any.
fn auth_for(reference: &Reference, credentials: &[RegistryCredential]) -> RegistryAuth {
    let registry = reference.resolve_registry();
    credentials
        .iter()
        .find(|c| c.registry == registry || c.registry == reference.registry())
        .map_or(RegistryAuth::Anonymous, |c| {
            RegistryAuth::Basic(c.username.clone(), c.password.clone())
        })
}

/// A one-way fingerprint of the credentials a pull used (`None`: anonymous), kept with the
/// image to decide who may reuse it.
fn fingerprint(auth: &RegistryAuth) -> Option<String> {
    match auth {
        RegistryAuth::Basic(user, password) => {
            Some(sha256_hex(format!("{user}\0{password}").as_bytes()))
        }
        _ => None,
    }
}

/// Whether a pull with `fingerprint` may use the cached `image` without the registry. As the
/// kubelet's "ensure secret pulled images": an image pulled with credentials is lent only to
/// the same credentials; any other pod's pull asks the registry again (only the manifest: the
/// layers are here).
fn may_reuse(image: &Image, fingerprint: Option<&str>) -> bool {
    match &image.granted_to {
        None => true,
        Some(granted) => fingerprint.is_some_and(|f| granted.iter().any(|g| g == f)),
    }
}

/// Who may reuse an image just pulled with `fingerprint` (`previous`: the record it replaces).
fn granted_after(
    previous: Option<&Image>,
    digest: &str,
    fingerprint: Option<String>,
) -> Option<Vec<String>> {
    let fingerprint = fingerprint?;
    let mut granted = previous
        .filter(|p| p.digest == digest)
        .and_then(|p| p.granted_to.clone())
        .unwrap_or_default();
    if !granted.contains(&fingerprint) {
        granted.push(fingerprint);
    }
    Some(granted)
}

impl ImageStore {
    /// `insecure` lists registries (host:port) spoken to over plain HTTP, such as a registry
    /// on loopback.
    pub fn new(state_dir: &Path, bound_bytes: u64, insecure: Vec<String>) -> ImageStore {
        ImageStore {
            root: state_dir.join("images"),
            bound_bytes,
            insecure,
            locks: Default::default(),
        }
    }

    /// The lock of a reference or blob (idle locks are dropped on the way).
    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(key.to_string()).or_default().clone()
    }

    /// A registry client for one pull. oci-client caches credentials and tokens per registry
    /// for a client's life, so a shared client would lend one pod's pull secret to the next.
    fn client(&self) -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
            platform_resolver: Some(Box::new(platform_resolver)),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            ..Default::default()
        })
    }

    /// Where a verified blob lives.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        Some(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", sha256_hex(reference.as_bytes())))
    }

    /// The image as last pulled, if all its blobs are still here.
    fn present(&self, reference: &str) -> Option<Image> {
        let text = std::fs::read_to_string(self.record_path(reference)).ok()?;
        let image: Image = serde_json::from_str(&text).ok()?;
        image
            .layers
            .iter()
            .all(|l| self.blob_path(&l.digest).is_some_and(|p| p.exists()))
            .then_some(image)
    }

    /// Makes the image available as `policy` says, and returns it.
    pub async fn pull(
        &self,
        reference: &str,
        policy: PullPolicy,
        credentials: &[RegistryCredential],
    ) -> Result<Image, PullError> {
        let parsed = parse_reference(reference)?;
        // As the kubelet: `:latest` or no tag means Always unless the pod says otherwise.
        let policy = match policy {
            PullPolicy::Unspecified
                if parsed.digest().is_none() && parsed.tag().is_none_or(|t| t == "latest") =>
            {
                PullPolicy::Always
            }
            PullPolicy::Unspecified => PullPolicy::IfNotPresent,
            other => other,
        };
        let auth = auth_for(&parsed, credentials);
        let fingerprint = fingerprint(&auth);
        let lock = self.lock_for(reference);
        let _pulling = lock.lock().await;
        let present = self.present(reference);
        if policy != PullPolicy::Always
            && let Some(image) = &present
            && may_reuse(image, fingerprint.as_deref())
        {
            self.touch(image);
            return Ok(image.clone());
        }
        if policy == PullPolicy::Never {
            return Err(PullError::NotPresent(reference.into()));
        }
        let registry = |e: OciDistributionError| PullError::Registry {
            reference: reference.into(),
            message: e.to_string(),
        };
        let disk = |source| PullError::Disk {
            reference: reference.into(),
            source,
        };
        let client = self.client();
        let (manifest, digest, config) = {
            let (manifest, digest, config, _) = client
                .pull_manifest_and_config_and_list_digest(&parsed, &auth)
                .await
                .map_err(registry)?;
            (manifest, digest, config)
        };
        for layer in &manifest.layers {
            self.fetch_blob(&client, &parsed, layer)
                .await
                .map_err(|e| match e {
                    Fetch::Registry(e) => registry(e),
                    Fetch::Disk(e) => disk(e),
                    Fetch::Refused(message) => PullError::Registry {
                        reference: reference.into(),
                        message,
                    },
                })?;
        }
        let granted_to = granted_after(present.as_ref(), &digest, fingerprint);
        let image = Image {
            reference: reference.into(),
            digest,
            config_media_type: manifest.config.media_type.clone(),
            config,
            layers: manifest
                .layers
                .iter()
                .map(|l| Layer {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size.max(0) as u64,
                })
                .collect(),
            granted_to,
        };
        let record = self.record_path(reference);
        std::fs::create_dir_all(record.parent().unwrap_or(&self.root)).map_err(disk)?;
        let text = serde_json::to_string(&image).unwrap_or_default();
        let partial = record.with_extension("json.partial");
        std::fs::write(&partial, text)
            .and_then(|()| std::fs::rename(&partial, &record))
            .map_err(disk)?;
        self.touch(&image);
        self.evict(&image);
        Ok(image)
    }

    /// Downloads one blob unless it is here, resuming a partial download, and verifies it.
    async fn fetch_blob(
        &self,
        client: &Client,
        image: &Reference,
        layer: &OciDescriptor,
    ) -> Result<(), Fetch> {
        let path = self.blob_path(&layer.digest).ok_or_else(|| {
            Fetch::Registry(OciDistributionError::GenericError(Some(format!(
                "unsupported digest {:?} (only sha256)",
                layer.digest
            ))))
        })?;
        let lock = self.lock_for(&layer.digest);
        let _fetching = lock.lock().await;
        if path.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(path.parent().unwrap_or(&self.root)).map_err(Fetch::Disk)?;
        let partial = path.with_extension("partial");
        let mut last = None;
        for attempt in 0..BLOB_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
            }
            match self.download(client, image, layer, &partial).await {
                Ok(()) => {
                    let file = partial.clone();
                    let digest = tokio::task::spawn_blocking(move || sha256_file(&file))
                        .await
                        .map_err(|e| Fetch::Disk(std::io::Error::other(e)))?
                        .map_err(Fetch::Disk)?;
                    if Some(digest.as_str()) != hex_of(&layer.digest) {
                        let _ = std::fs::remove_file(&partial);
                        last = Some(Fetch::Registry(OciDistributionError::GenericError(Some(
                            format!("blob {} does not match its digest", layer.digest),
                        ))));
                        continue;
                    }
                    std::fs::rename(&partial, &path).map_err(Fetch::Disk)?;
                    return Ok(());
                }
                Err(e @ (Fetch::Disk(_) | Fetch::Refused(_))) => return Err(e),
                Err(e) => {
                    tracing::info!(blob = %layer.digest, attempt, error = %e, "blob download interrupted; resuming");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(Fetch::Registry(OciDistributionError::GenericError(None))))
    }

    /// Appends the rest of the blob to `partial` (all of it if the registry ignores ranges).
    async fn download(
        &self,
        client: &Client,
        image: &Reference,
        layer: &OciDescriptor,
        partial: &Path,
    ) -> Result<(), Fetch> {
        let declared = declared_size(layer, self.bound_bytes).map_err(Fetch::Refused)?;
        let offset = std::fs::metadata(partial).map_or(0, |m| m.len());
        let response = client
            .pull_blob_stream_partial(image, layer, offset, None)
            .await
            .map_err(Fetch::Registry)?;
        let (mut stream, append) = match response {
            BlobResponse::Full(stream) => (stream, false),
            BlobResponse::Partial(stream) => (stream, true),
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(partial)
            .await
            .map_err(Fetch::Disk)?;
        let mut written = if append { offset } else { 0 };
        while let Some(bytes) = stream.next().await {
            let bytes = bytes.map_err(|e| Fetch::Registry(OciDistributionError::IoError(e)))?;
            written = written.saturating_add(bytes.len() as u64);
            if written > declared {
                drop(file);
                let _ = tokio::fs::remove_file(partial).await;
                return Err(Fetch::Refused(format!(
                    "blob {} is larger than the {declared} bytes its descriptor declares: \
                     the registry served something else; the download was stopped there",
                    layer.digest
                )));
            }
            file.write_all(&bytes).await.map_err(Fetch::Disk)?;
        }
        file.flush().await.map_err(Fetch::Disk)?;
        Ok(())
    }

    /// Every blob in the cache: its path, size and last use.
    fn blobs(&self) -> Vec<(PathBuf, u64, SystemTime)> {
        let Ok(entries) = std::fs::read_dir(self.root.join("blobs/sha256")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                Some((e.path(), meta.len(), meta.modified().ok()?))
            })
            .collect()
    }

    /// What the owner's `max_disk` leaves beside the image cache: the room a container's
    /// unpacked root filesystem may take.
    pub fn room_left(&self) -> u64 {
        let cached: u64 = self.blobs().iter().map(|b| b.1).sum();
        self.bound_bytes.saturating_sub(cached)
    }

    /// Marks the image's blobs as just used.
    fn touch(&self, image: &Image) {
        let now = SystemTime::now();
        for layer in &image.layers {
            if let Some(path) = self.blob_path(&layer.digest)
                && let Ok(file) = std::fs::File::options().append(true).open(&path)
            {
                let _ = file.set_modified(now);
            }
        }
    }

    /// Deletes the least recently used blobs until the cache is within its bound, never one
    /// of `keep`.
    fn evict(&self, keep: &Image) {
        let blobs = self.blobs();
        let keep: Vec<PathBuf> = keep
            .layers
            .iter()
            .filter_map(|l| self.blob_path(&l.digest))
            .collect();
        for path in evictable(blobs, &keep, self.bound_bytes) {
            tracing::info!(blob = %path.display(), "evicting a least recently used image blob");
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The size a blob's descriptor declares, if the device can hold it at all: one larger than
/// the whole image cache (`max_disk`), or a nonsense size, is refused before any download.
fn declared_size(layer: &OciDescriptor, bound: u64) -> Result<u64, String> {
    let size = u64::try_from(layer.size)
        .map_err(|_| format!("blob {} declares a negative size", layer.digest))?;
    if size > bound {
        return Err(format!(
            "blob {} is {size} bytes, more than this device's max_disk ({bound} bytes) allows \
             for images: the owner's offer is too small for this image",
            layer.digest
        ));
    }
    Ok(size)
}

/// Which blobs to delete, oldest use first, to bring the total within `bound`.
fn evictable(
    mut blobs: Vec<(PathBuf, u64, SystemTime)>,
    keep: &[PathBuf],
    bound: u64,
) -> Vec<PathBuf> {
    let mut total: u64 = blobs.iter().map(|b| b.1).sum();
    blobs.sort_by_key(|b| b.2);
    let mut gone = Vec::new();
    for (path, size, _) in blobs {
        if total <= bound {
            break;
        }
        if keep.contains(&path) {
            continue;
        }
        total -= size;
        gone.push(path);
    }
    gone
}

#[derive(Debug, thiserror::Error)]
enum Fetch {
    #[error("{0}")]
    Registry(OciDistributionError),
    #[error("{0}")]
    Disk(std::io::Error),
    /// The blob is not what its descriptor promised: asking again will not help.
    #[error("{0}")]
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_pulled_with_credentials_is_lent_only_to_the_same_credentials() {
        let alice = fingerprint(&RegistryAuth::Basic("alice".into(), "a".into()));
        let bob = fingerprint(&RegistryAuth::Basic("bob".into(), "b".into()));
        let image = |granted_to| Image {
            reference: "r/x:1".into(),
            digest: "sha256:1".into(),
            config_media_type: String::new(),
            config: String::new(),
            layers: Vec::new(),
            granted_to,
        };
        let public = image(granted_after(None, "sha256:1", None));
        assert!(may_reuse(&public, None) && may_reuse(&public, bob.as_deref()));

        let private = image(granted_after(None, "sha256:1", alice.clone()));
        assert!(may_reuse(&private, alice.as_deref()));
        assert!(
            !may_reuse(&private, None),
            "an anonymous pull asks the registry"
        );
        assert!(!may_reuse(&private, bob.as_deref()));

        let both = image(granted_after(Some(&private), "sha256:1", bob.clone()));
        assert!(may_reuse(&both, alice.as_deref()) && may_reuse(&both, bob.as_deref()));
        let moved = image(granted_after(Some(&both), "sha256:2", bob.clone()));
        assert!(
            !may_reuse(&moved, alice.as_deref()),
            "a new digest starts afresh"
        );
    }

    #[test]
    fn eviction_drops_the_least_recently_used_first_and_keeps_the_current_image() {
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let blobs = vec![
            (PathBuf::from("new"), 40, t(30)),
            (PathBuf::from("old"), 40, t(10)),
            (PathBuf::from("current"), 40, t(5)),
            (PathBuf::from("mid"), 40, t(20)),
        ];
        let gone = evictable(blobs.clone(), &[PathBuf::from("current")], 90);
        assert_eq!(gone, vec![PathBuf::from("old"), PathBuf::from("mid")]);
        assert!(evictable(blobs, &[], 1000).is_empty());
    }

    #[test]
    fn references_parse_as_the_kubelet_parses_them() {
        assert!(parse_reference("127.0.0.1:5000/e2e/hello:v1").is_ok());
        assert!(parse_reference("busybox").is_ok());
        for bad in ["UPPER/case:v1", "", "a b"] {
            let error = parse_reference(bad).unwrap_err();
            assert_eq!(error.reason(), "InvalidImageName", "{bad:?}");
        }
    }

    #[test]
    fn a_file_hashes_as_its_bytes_do() {
        let path = std::env::temp_dir().join(format!("darkcore-sha-{}", std::process::id()));
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(sha256_file(&path).unwrap(), sha256_hex(&bytes));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn only_sha256_digests_name_blobs() {
        let hex = "a".repeat(64);
        assert_eq!(hex_of(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(hex_of("sha256:../../etc/passwd"), None);
        assert_eq!(hex_of(&format!("sha512:{hex}")), None);
    }

    #[test]
    fn pull_errors_speak_kubernetes() {
        let invalid = PullError::InvalidName {
            reference: "UPPER/Case".into(),
            why: "bad".into(),
        };
        assert_eq!(invalid.reason(), "InvalidImageName");
        assert!(!invalid.retryable());
        let registry = PullError::Registry {
            reference: "r".into(),
            message: "404".into(),
        };
        assert_eq!(registry.reason(), "ErrImagePull");
        assert!(registry.retryable());
    }

    #[test]
    fn credentials_match_the_reference_registry() {
        let reference: Reference = "127.0.0.1:5000/private/app:1".parse().unwrap();
        let creds = vec![RegistryCredential {
            registry: "127.0.0.1:5000".into(),
            username: "u".into(),
            password: "p".into(),
        }];
        assert!(matches!(auth_for(&reference, &creds), RegistryAuth::Basic(u, _) if u == "u"));
        let other: Reference = "example.com/app:1".parse().unwrap();
        assert!(matches!(auth_for(&other, &creds), RegistryAuth::Anonymous));
    }

    #[test]
    fn a_blob_larger_than_the_disk_offer_or_of_negative_size_is_refused_before_download() {
        let descriptor = |size| OciDescriptor {
            digest: "sha256:ab".into(),
            size,
            ..Default::default()
        };
        assert_eq!(declared_size(&descriptor(100), 1000), Ok(100));
        let too_big = declared_size(&descriptor(1001), 1000).unwrap_err();
        assert!(too_big.contains("max_disk"), "{too_big}");
        assert!(declared_size(&descriptor(-1), 1000).is_err());
    }
}
