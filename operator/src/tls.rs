//! The operator's certificates: the serving certificates the gateway and the kubelet API
//! present, the device certificates the gateway signs at join, and reading a device's
//! identity back from its certificate.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};

use crate::enroll::ca::CaMaterial;

/// The DNS name every gateway certificate carries and every agent verifies, whatever address
/// it dials: trust comes from the pinned CA, so the name need not match the network path.
pub const GATEWAY_NAME: &str = "darkcore-gateway";
/// How long a device certificate is valid unless `--device-cert-validity` says otherwise. The
/// gateway renews it over the device's stream halfway through; a device away longer than that
/// joins again.
pub const DEFAULT_DEVICE_CERT_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate request is not valid: {0}")]
    BadRequest(String),
    #[error("signing with the device CA: {0}")]
    Sign(#[source] rcgen::Error),
    #[error("the subject alternative name {name:?} is neither a DNS name nor an IP address")]
    BadName { name: String },
}

/// The gateway's serving certificate chain (leaf, then CA) and key, PEM.
pub struct ServingIdentity {
    pub chain_pem: String,
    pub key_pem: String,
}

fn issuer(ca: &CaMaterial) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let key = KeyPair::from_pem(&ca.key_pem).map_err(TlsError::Sign)?;
    Issuer::from_ca_cert_pem(&ca.cert_pem, key).map_err(TlsError::Sign)
}

fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TlsError::Sign(rcgen::Error::RingUnspecified))?;
    bytes[0] &= 0x7f; // a positive serial
    Ok(SerialNumber::from_slice(&bytes))
}

fn validity(params: &mut CertificateParams, length: Duration) {
    let now = SystemTime::now();
    // An hour of slack for devices whose clocks run behind.
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + length).into();
}

/// Whether `name` is a DNS name (letters, digits and hyphens, in dot-separated labels).
fn dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A fresh serving certificate for [`GATEWAY_NAME`] and `extra_names` (DNS names or IPs that
/// other clients may dial), signed by the CA. Made at every start; nothing to store.
pub fn serving_identity(
    ca: &CaMaterial,
    extra_names: &[String],
) -> Result<ServingIdentity, TlsError> {
    let key = KeyPair::generate().map_err(TlsError::Sign)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names.push(SanType::DnsName(
        GATEWAY_NAME.try_into().map_err(TlsError::Sign)?,
    ));
    for name in extra_names {
        let san = match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if dns_name(name) => SanType::DnsName(
                name.as_str()
                    .try_into()
                    .map_err(|_| TlsError::BadName { name: name.clone() })?,
            ),
            Err(_) => return Err(TlsError::BadName { name: name.clone() }),
        };
        params.subject_alt_names.push(san);
    }
    params
        .distinguished_name
        .push(DnType::CommonName, GATEWAY_NAME);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, Duration::from_secs(90 * 86_400));
    let cert = params
        .signed_by(&key, &issuer(ca)?)
        .map_err(TlsError::Sign)?;
    Ok(ServingIdentity {
        chain_pem: format!("{}{}", cert.pem(), ca.cert_pem),
        key_pem: key.serialize_pem(),
    })
}

fn parse_request(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, TlsError> {
    CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
        .map_err(|e| TlsError::BadRequest(e.to_string()))
}

/// Whether `csr_der` is a certificate request we can sign.
pub fn check_request(csr_der: &[u8]) -> Result<(), TlsError> {
    parse_request(csr_der).map(|_| ())
}

/// Signs the key in `csr_der` as device `device_id` of `pool`. Only the request's key is
/// used: the subject, names and usages are the operator's, so a device cannot ask to be
/// another device, or a server.
pub fn sign_device(
    ca: &CaMaterial,
    csr_der: &[u8],
    identity: &DeviceIdentity,
    lasting: Duration,
) -> Result<String, TlsError> {
    let request = parse_request(csr_der)?;
    device_certificate(ca, &request.public_key, identity, lasting)
}

/// A new certificate for the device that presented `cert_der` (already verified by TLS): the
/// same key and identity, valid for `lasting` from now.
pub fn renew_device(
    ca: &CaMaterial,
    cert_der: &[u8],
    lasting: Duration,
) -> Result<String, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| TlsError::BadRequest(format!("the certificate does not parse: {e}")))?;
    let key = rcgen::SubjectPublicKeyInfo::from_der(cert.public_key().raw)
        .map_err(|e| TlsError::BadRequest(format!("the certificate's key: {e}")))?;
    let identity = identity_of(cert_der).map_err(TlsError::BadRequest)?;
    device_certificate(ca, &key, &identity, lasting)
}

/// When a certificate runs out.
pub fn not_after(cert_der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// When a device certificate running out at `not_after` is renewed, as of `now`: halfway
/// through `lasting` before it runs out, or at once if it lasts longer than `lasting` allows
/// (one issued before a shorter validity was set).
pub fn renewal_due(not_after: SystemTime, now: SystemTime, lasting: Duration) -> SystemTime {
    // The hour of slack `validity` gives not_before is no reason to renew.
    if not_after > now + lasting + Duration::from_secs(3600) {
        return now;
    }
    not_after
        .checked_sub(lasting / 2)
        .map_or(now, |due| due.max(now))
}

fn device_certificate(
    ca: &CaMaterial,
    key: &impl rcgen::PublicKeyData,
    identity: &DeviceIdentity,
    lasting: Duration,
) -> Result<String, TlsError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.device_id.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, identity.pool.as_str());
    if let Some(owner) = &identity.owner {
        params
            .distinguished_name
            .push(DnType::OrganizationName, owner.as_str());
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, lasting);
    let cert = params
        .signed_by(key, &issuer(ca)?)
        .map_err(TlsError::Sign)?;
    Ok(cert.pem())
}

/// Who a device is, as its certificate says: its id (CN), its pool (OU), and its owner (O)
/// when the join token named one. The operator signs all three, so a device cannot change them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DeviceIdentity {
    pub device_id: String,
    pub pool: String,
    pub owner: Option<String>,
}

impl DeviceIdentity {
    /// A device of `pool` whose token named no owner.
    pub fn unowned(device_id: &str, pool: &str) -> DeviceIdentity {
        DeviceIdentity {
            device_id: device_id.into(),
            pool: pool.into(),
            owner: None,
        }
    }
}

/// Reads the identity from a device certificate that TLS has already verified against the CA.
pub fn identity_of(cert_der: &[u8]) -> Result<DeviceIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("the client certificate does not parse: {e}"))?;
    let subject = cert.subject();
    let first = |values: Vec<&x509_parser::x509::AttributeTypeAndValue<'_>>, what: &str| {
        values
            .first()
            .and_then(|v| v.as_str().ok())
            .map(str::to_string)
            .ok_or_else(|| format!("the client certificate has no {what}"))
    };
    Ok(DeviceIdentity {
        device_id: first(subject.iter_common_name().collect(), "device id (CN)")?,
        pool: first(subject.iter_organizational_unit().collect(), "pool (OU)")?,
        owner: first(subject.iter_organization().collect(), "owner (O)").ok(),
    })
}

/// A new device id: `dev-` and 12 random hex digits.
pub fn new_device_id() -> Result<String, TlsError> {
    let mut bytes = [0u8; 6];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TlsError::Sign(rcgen::Error::RingUnspecified))?;
    Ok(format!(
        "dev-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "dev-000000000000");
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    #[test]
    fn a_device_certificate_carries_the_operators_identity_not_the_requested_one() {
        let ca = CaMaterial::generate().unwrap();
        let (_key, csr) = csr();
        let me = DeviceIdentity::unowned("dev-0123456789ab", "lab");
        let pem_text = sign_device(&ca, &csr, &me, DEFAULT_DEVICE_CERT_VALIDITY).unwrap();
        let der = pem::parse(&pem_text).unwrap().into_contents();
        assert_eq!(identity_of(&der).unwrap(), me);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(
            cert.subject_alternative_name().unwrap().is_none(),
            "names the device asked for are dropped"
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn a_renewed_certificate_keeps_the_key_and_identity_owner_included_and_runs_out_later() {
        let ca = CaMaterial::generate().unwrap();
        let (key, csr) = csr();
        let me = DeviceIdentity {
            owner: Some("alice@example.org".into()),
            ..DeviceIdentity::unowned("dev-0123456789ab", "lab")
        };
        let first = sign_device(&ca, &csr, &me, Duration::from_secs(60)).unwrap();
        let first = pem::parse(&first).unwrap().into_contents();
        let renewed = renew_device(&ca, &first, DEFAULT_DEVICE_CERT_VALIDITY).unwrap();
        let renewed = pem::parse(&renewed).unwrap().into_contents();
        assert_eq!(identity_of(&renewed).unwrap(), me);
        let (_, cert) = x509_parser::parse_x509_certificate(&renewed).unwrap();
        assert_eq!(
            cert.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        let (first_end, renewed_end) = (not_after(&first).unwrap(), not_after(&renewed).unwrap());
        assert!(renewed_end > first_end + Duration::from_secs(6 * 86_400));
        assert!(renew_device(&ca, b"garbage", DEFAULT_DEVICE_CERT_VALIDITY).is_err());
    }

    #[test]
    fn certificates_are_renewed_halfway_or_at_once_when_they_last_too_long() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let week = Duration::from_secs(7 * 86_400);
        let day = Duration::from_secs(86_400);
        assert_eq!(renewal_due(now + week, now, week), now + week / 2);
        assert_eq!(renewal_due(now + day, now, week), now, "past halfway: now");
        assert_eq!(
            renewal_due(now + Duration::from_secs(365 * 86_400), now, week),
            now,
            "a year-long certificate from before is shortened at once"
        );
    }

    #[test]
    fn garbage_requests_are_refused() {
        let ca = CaMaterial::generate().unwrap();
        let me = DeviceIdentity::unowned("dev-0123456789ab", "lab");
        let err = sign_device(&ca, b"not a csr", &me, DEFAULT_DEVICE_CERT_VALIDITY).unwrap_err();
        assert!(matches!(err, TlsError::BadRequest(_)), "{err}");
    }

    #[test]
    fn the_serving_certificate_names_the_gateway_and_chains_to_the_ca() {
        let ca = CaMaterial::generate().unwrap();
        let identity =
            serving_identity(&ca, &["127.0.0.1".into(), "gw.example.com".into()]).unwrap();
        let blocks = pem::parse_many(&identity.chain_pem).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[1].contents(), ca.cert_der().unwrap());
        let (_, leaf) = x509_parser::parse_x509_certificate(blocks[0].contents()).unwrap();
        let names = format!("{:?}", leaf.subject_alternative_name().unwrap().unwrap());
        assert!(
            names.contains(GATEWAY_NAME) && names.contains("gw.example.com"),
            "{names}"
        );
        assert!(serving_identity(&ca, &["not a name!".into()]).is_err());
    }

    #[test]
    fn device_ids_are_random_and_shaped() {
        let (a, b) = (new_device_id().unwrap(), new_device_id().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("dev-") && a.len() == 16, "{a}");
    }
}
