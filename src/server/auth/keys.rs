//! Public keys that verify tokens: one from a PEM file, or a set from a JWKS document.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// A public key and the algorithms its type allows, so that a token can never pick an
/// algorithm of another family for it (an HS256 token "signed" with the public key's PEM).
#[derive(Clone)]
pub struct VerifyingKey {
    /// The JWKS `kid` that selects this key; `None` for a PEM file's key.
    pub kid: Option<String>,
    /// The algorithms this key may verify.
    pub algorithms: Vec<Algorithm>,
    /// The key itself.
    pub key: DecodingKey,
}

impl VerifyingKey {
    /// Whether this key may verify a token signed with `algorithm`.
    pub fn accepts(&self, algorithm: Algorithm) -> bool {
        self.algorithms.contains(&algorithm)
    }
}

const RSA_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

// The DER encodings of the algorithm and curve object identifiers that tell a PEM key's type.
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// The key of a PEM file: an RSA (`PUBLIC KEY` or `RSA PUBLIC KEY`), EC P-256 or P-384, or
/// Ed25519 public key. The error says what the file holds instead.
pub fn from_pem(pem: &[u8]) -> Result<VerifyingKey, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "is not a PEM text file".to_owned())?;
    if text.contains("PRIVATE KEY-----") {
        return Err(
            "holds a private key; give the public key (openssl pkey -in KEY -pubout)".to_owned(),
        );
    }
    let (label, der) = pem_body(text).ok_or("holds no PEM block")?;
    if label == "RSA PUBLIC KEY" {
        // PKCS#1: the DER is the RSAPublicKey itself.
        return Ok(VerifyingKey {
            kid: None,
            algorithms: RSA_ALGORITHMS.to_vec(),
            key: DecodingKey::from_rsa_der(&der),
        });
    }
    let (algorithm_id, public_key) = subject_public_key(&der)
        .ok_or("holds no public key (SubjectPublicKeyInfo) that can be read")?;
    let names = |oid: &[u8]| algorithm_id.windows(oid.len()).any(|window| window == oid);
    // jsonwebtoken's DER constructors take what the BIT STRING holds: PKCS#1 for RSA, the
    // curve point for EC, the 32 raw bytes for Ed25519.
    let (algorithms, key) = if names(OID_RSA_ENCRYPTION) {
        (
            RSA_ALGORITHMS.to_vec(),
            DecodingKey::from_rsa_der(public_key),
        )
    } else if names(OID_P256) {
        (vec![Algorithm::ES256], DecodingKey::from_ec_der(public_key))
    } else if names(OID_P384) {
        (vec![Algorithm::ES384], DecodingKey::from_ec_der(public_key))
    } else if names(OID_ED25519) {
        (vec![Algorithm::EdDSA], DecodingKey::from_ed_der(public_key))
    } else {
        return Err(
            "holds no RSA, EC P-256, EC P-384 or Ed25519 public key (other curves are not supported)"
                .to_owned(),
        );
    };
    Ok(VerifyingKey {
        kid: None,
        algorithms,
        key,
    })
}

/// The first PEM block's label and its decoded bytes.
fn pem_body(text: &str) -> Option<(&str, Vec<u8>)> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + "-----BEGIN ".len()..];
    let (label, rest) = rest.split_once("-----")?;
    let end = rest.find("-----END ")?;
    let base64: String = rest[..end].chars().filter(|c| !c.is_whitespace()).collect();
    Some((label, STANDARD.decode(base64).ok()?))
}

/// A SubjectPublicKeyInfo's algorithm identifier and the key bytes of its BIT STRING.
fn subject_public_key(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let (0x30, info, _) = der_element(der)? else {
        return None;
    };
    let (0x30, algorithm_id, rest) = der_element(info)? else {
        return None;
    };
    let (0x03, bits, _) = der_element(rest)? else {
        return None;
    };
    // The first byte counts the unused bits of the last one; a key uses whole bytes.
    match bits.split_first()? {
        (0, key) => Some((algorithm_id, key)),
        _ => None,
    }
}

/// One DER element: its tag, its content and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (digits, rest) = rest.split_at(count);
        let length = digits
            .iter()
            .fold(0usize, |length, &digit| length << 8 | usize::from(digit));
        (length, rest)
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

/// The algorithm a JWK's `alg` names, if this server verifies it.
fn named_algorithm(named: KeyAlgorithm) -> Option<Algorithm> {
    Some(match named {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The signing keys of a JWKS document. Keys this server cannot use (encryption keys, other
/// curves, symmetric keys) are skipped rather than failing the whole set, since providers
/// publish them side by side; the count of skipped keys is returned for the log.
pub fn from_jwks(json: &[u8]) -> Result<(Vec<VerifyingKey>, usize), String> {
    let set: JwkSet = serde_json::from_slice(json)
        .map_err(|error| format!("is not a JWKS document ({error})"))?;
    let total = set.keys.len();
    let keys: Vec<VerifyingKey> = set
        .keys
        .iter()
        .filter(|jwk| !matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)))
        .filter_map(|jwk| {
            let algorithms = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => RSA_ALGORITHMS.to_vec(),
                AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                    EllipticCurve::P256 => vec![Algorithm::ES256],
                    EllipticCurve::P384 => vec![Algorithm::ES384],
                    _ => return None,
                },
                AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                    vec![Algorithm::EdDSA]
                }
                _ => return None,
            };
            // A key that names its algorithm verifies that one only (RFC 7517 §4.4).
            let algorithms = match jwk.common.key_algorithm {
                Some(named) => {
                    let named = named_algorithm(named)?;
                    algorithms.contains(&named).then(|| vec![named])?
                }
                None => algorithms,
            };
            Some(VerifyingKey {
                kid: jwk.common.key_id.clone(),
                algorithms,
                key: DecodingKey::from_jwk(jwk).ok()?,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(format!(
            "holds no key this server can verify with ({total} keys: RSA, EC P-256/P-384 and Ed25519 signing keys are supported)"
        ));
    }
    let skipped = total - keys.len();
    Ok((keys, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/jwt/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn each_pem_key_type_gets_only_its_own_algorithms() {
        let cases = [
            ("rsa_public.pem", Algorithm::RS256),
            ("ec256_public.pem", Algorithm::ES256),
            ("ec384_public.pem", Algorithm::ES384),
            ("ed25519_public.pem", Algorithm::EdDSA),
        ];
        for (file, algorithm) in cases {
            let key = from_pem(&fixture(file)).unwrap();
            assert!(key.accepts(algorithm), "{file}");
            assert!(!key.accepts(Algorithm::HS256), "{file}");
        }
        assert!(!from_pem(&fixture("ec256_public.pem"))
            .unwrap()
            .accepts(Algorithm::ES384));
    }

    #[test]
    fn a_truncated_key_is_refused_not_misread() {
        let text = String::from_utf8(fixture("ec256_public.pem")).unwrap();
        let (_, der) = pem_body(&text).unwrap();
        for end in 0..der.len() {
            assert!(subject_public_key(&der[..end]).is_none(), "{end}");
        }
        assert!(subject_public_key(&der).is_some());
    }

    #[test]
    fn a_private_key_or_garbage_is_refused_with_a_reason() {
        let error = from_pem(&fixture("rsa_private.pem")).err().unwrap();
        assert!(error.contains("private key"), "{error}");
        assert!(from_pem(b"not a key")
            .err()
            .unwrap()
            .contains("no PEM block"));
    }

    #[test]
    fn jwks_keys_keep_their_kid_and_unusable_keys_are_skipped() {
        let json = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0","kid":"hmac"},
            {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"ed","alg":"EdDSA"}
        ]}"#;
        let (keys, skipped) = from_jwks(json).unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(keys[0].kid.as_deref(), Some("ed"));
        assert_eq!(keys[0].algorithms, vec![Algorithm::EdDSA]);
        assert!(from_jwks(br#"{"keys":[]}"#).is_err());
        assert!(from_jwks(b"{}").is_err());
    }
}
