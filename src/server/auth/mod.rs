//! JWT bearer authentication: tokens whose `sub` is the user id, signed with the HMAC secret
//! (`JWT_SECRET`) or by an identity provider whose public keys are configured
//! (`JWT_PUBLIC_KEY_FILE`, `JWT_JWKS_URL`).

mod cache;
mod jwks;
mod keys;

use std::borrow::Cow;
use std::time::Duration;

use hyper::header::{HeaderMap, AUTHORIZATION, COOKIE};
use hyper::{Method, Request};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};

use cache::VerifiedTokens;
pub use jwks::{Jwks, MIN_REFETCH_INTERVAL};
pub use keys::{from_jwks, from_pem, VerifyingKey};

use super::error::{ApiError, MISSING_TOKEN};
use super::request::{query_param, require_json_content_type};

/// The `role` claim that allows `POST /ai/events/publish`.
pub const PUBLISHER_ROLE: &str = "publisher";

/// The claims this server reads and writes.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id; events go to the streams of this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, in seconds since the Unix epoch; defaulted here so that a missing `exp` is
    /// reported as such by the validation, not as a malformed token.
    #[serde(default)]
    pub exp: u64,
    /// `publisher` for tokens that may publish over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Who a verified token speaks for, and until when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub user_id: String,
    /// Whether the token carries the publisher role.
    pub publisher: bool,
    /// When the token stops being accepted, in seconds since the Unix epoch: its `exp` plus
    /// the leeway. A stream opened with it ends then.
    pub valid_until: u64,
}

/// What a token must claim besides a signature: set from `JWT_AUDIENCE`, `JWT_ISSUER`,
/// `JWT_LEEWAY_SECS` and `JWT_ALGORITHMS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimRules {
    /// Accepted `aud` values; when not empty, a token must name one of them.
    pub audience: Vec<String>,
    /// The one accepted `iss`; when set, a token must name it.
    pub issuer: Option<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_secs: u64,
    /// When set, only these algorithms are accepted, whatever the keys allow.
    pub algorithms: Option<Vec<Algorithm>>,
}

/// Verifies tokens against the configured keys and claim rules, and signs tokens with the
/// HMAC secret (`token`, the demo's sessions).
pub struct Authenticator {
    signing_algorithm: Algorithm,
    encoding_key: EncodingKey,
    /// The HMAC key, when HMAC tokens are accepted (`JWT_SECRET`, or development mode).
    hmac: Option<DecodingKey>,
    public_key: Option<VerifyingKey>,
    jwks: Option<Jwks>,
    rules: ClaimRules,
    /// One `Validation` per algorithm, built once: building one allocates, and every request
    /// verifies a token.
    validations: Vec<(Algorithm, Validation)>,
    verified: VerifiedTokens,
}

/// Every algorithm a token may name; jsonwebtoken checks a `Validation`'s algorithms against
/// the key's family, so each needs a `Validation` of its own.
const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

impl Authenticator {
    /// An authenticator for `secret` that accepts only `algorithm` (an HMAC one), with the
    /// default leeway and no audience or issuer rule.
    pub fn new(secret: &[u8], algorithm: Algorithm) -> Self {
        let rules = ClaimRules {
            leeway_secs: crate::config::DEFAULT_JWT_LEEWAY_SECS,
            ..ClaimRules::default()
        };
        Self::with_keys(Some(secret), algorithm, None, None, rules)
    }

    /// An authenticator over any of the key sources. Without a `secret`, HMAC tokens are
    /// refused, and `issue` signs with a random key that nothing accepts.
    pub fn with_keys(
        secret: Option<&[u8]>,
        hmac_algorithm: Algorithm,
        public_key: Option<VerifyingKey>,
        jwks: Option<Jwks>,
        rules: ClaimRules,
    ) -> Self {
        let random;
        let signing_secret = match secret {
            Some(secret) => secret,
            None => {
                random = crate::random::hex_token(32);
                random.as_bytes()
            }
        };
        let validations = ALGORITHMS
            .into_iter()
            .map(|algorithm| (algorithm, validation(&rules, algorithm)))
            .collect();
        Authenticator {
            signing_algorithm: hmac_algorithm,
            encoding_key: EncodingKey::from_secret(signing_secret),
            hmac: secret.map(DecodingKey::from_secret),
            public_key,
            jwks,
            rules,
            validations,
            verified: VerifiedTokens::default(),
        }
    }

    /// The authenticator the configuration asks for: the PEM file read and the JWKS fetched
    /// now, so that a key that cannot be used refuses the start with a clear error.
    pub async fn from_config(
        config: &crate::config::Config,
        tls: Option<std::sync::Arc<dyn crate::http_client::TlsConnector>>,
    ) -> Result<Self, String> {
        let public_key = match &config.jwt_public_key_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|error| {
                    format!(
                        "JWT_PUBLIC_KEY_FILE {} cannot be read: {error}",
                        path.display()
                    )
                })?;
                let key = from_pem(&pem).map_err(|problem| {
                    format!("JWT_PUBLIC_KEY_FILE {} {problem}", path.display())
                })?;
                crate::log::info!(
                    "JWT_PUBLIC_KEY_FILE: accepting {:?} tokens signed by {}",
                    key.algorithms,
                    path.display()
                );
                Some(key)
            }
            None => None,
        };
        let jwks = match &config.jwt_jwks_url {
            Some(url) => {
                let jwks = Jwks::fetch(url, tls)
                    .await
                    .map_err(|problem| format!("JWT_JWKS_URL {problem}"))?;
                crate::log::info!("JWT_JWKS_URL: {} keys loaded", jwks.key_count());
                Some(jwks)
            }
            None => None,
        };
        Ok(Self::for_config(config, public_key, jwks))
    }

    /// The configuration's HMAC secret and claim rules, with these key sources.
    pub fn for_config(
        config: &crate::config::Config,
        public_key: Option<VerifyingKey>,
        jwks: Option<Jwks>,
    ) -> Self {
        let secret = config.jwt_secret.as_ref().map(|secret| secret.expose());
        let rules = config.jwt_rules.clone();
        Self::with_keys(
            secret.map(str::as_bytes),
            config.jwt_algorithm,
            public_key,
            jwks,
            rules,
        )
    }

    /// A token for `user_id`, valid for `ttl`, with the publisher role if asked.
    pub fn issue(&self, user_id: &str, publisher: bool, ttl: Duration) -> String {
        let claims = Claims {
            sub: Some(user_id.to_owned()),
            exp: crate::time::unix_seconds() + ttl.as_secs(),
            role: publisher.then(|| PUBLISHER_ROLE.to_owned()),
        };
        encode(
            &Header::new(self.signing_algorithm),
            &claims,
            &self.encoding_key,
        )
        .expect("HMAC signing of serializable claims cannot fail")
    }

    /// Verifies the `Authorization: Bearer` header.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        self.verify(bearer_token(headers)?).await
    }

    /// Verifies one token string: header, key, signature, algorithm, expiry, audience,
    /// issuer and a non-blank `sub`.
    pub async fn verify(&self, token: &str) -> Result<Identity, ApiError> {
        // Read before the key lookup: a refetch meanwhile leaves this token unremembered.
        let generation = self.jwks.as_ref().map_or(0, Jwks::generation);
        if let Some(identity) = self
            .verified
            .get(token, generation, crate::time::unix_seconds())
        {
            return Ok(identity);
        }
        let header = decode_header(token).map_err(|_| {
            // `none` is no algorithm jsonwebtoken knows, so such a header does not parse.
            ApiError::Unauthorized(if declares_alg_none(token) {
                "token algorithm is not accepted"
            } else {
                "token is malformed"
            })
        })?;
        // RFC 7515 §4.1.11: a token that needs an extension this server does not implement
        // (it implements none) must be refused.
        if header.crit.is_some() {
            return Err(ApiError::Unauthorized(
                "token has a crit header parameter this server does not understand",
            ));
        }
        let algorithm = header.alg;
        if let Some(accepted) = &self.rules.algorithms {
            if !accepted.contains(&algorithm) {
                return Err(ApiError::Unauthorized("token algorithm is not accepted"));
            }
        }
        let key = self.key_for(algorithm, header.kid.as_deref()).await?;
        let validation = self
            .validations
            .iter()
            .find_map(|(known, validation)| (*known == algorithm).then_some(validation))
            .ok_or(ApiError::Unauthorized("token algorithm is not accepted"))?;
        let claims = decode::<Claims>(token, &key, validation)
            .map_err(|error| ApiError::Unauthorized(reason(error.kind())))?
            .claims;
        // A blank `sub` names nobody: refused like a missing one.
        let user_id = claims
            .sub
            .filter(|sub| !sub.trim().is_empty())
            .ok_or(ApiError::Unauthorized("token has no sub claim"))?;
        let identity = Identity {
            user_id,
            publisher: claims.role.as_deref() == Some(PUBLISHER_ROLE),
            valid_until: claims.exp.saturating_add(self.rules.leeway_secs),
        };
        self.verified.insert(token, generation, &identity);
        Ok(identity)
    }

    /// The key that may verify a token signed with `algorithm`: only a key of that
    /// algorithm's own type, so that no token chooses how it is checked. Borrowed, except a
    /// JWKS key, which a refetch may replace meanwhile.
    async fn key_for(
        &self,
        algorithm: Algorithm,
        kid: Option<&str>,
    ) -> Result<Cow<'_, DecodingKey>, ApiError> {
        let not_accepted = ApiError::Unauthorized("token algorithm is not accepted");
        if matches!(
            algorithm,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return match &self.hmac {
                Some(key) if algorithm == self.signing_algorithm => Ok(Cow::Borrowed(key)),
                _ => Err(not_accepted),
            };
        }
        let public_key = self
            .public_key
            .as_ref()
            .filter(|key| key.accepts(algorithm));
        if let (Some(jwks), Some(kid)) = (&self.jwks, kid) {
            if let Some(key) = jwks.key(kid, algorithm).await {
                return Ok(Cow::Owned(key));
            }
            return match public_key {
                Some(key) => Ok(Cow::Borrowed(&key.key)),
                None => Err(ApiError::Unauthorized("token kid names no known key")),
            };
        }
        if let Some(key) = public_key {
            return Ok(Cow::Borrowed(&key.key));
        }
        match &self.jwks {
            Some(jwks) => {
                jwks.only_key_for(algorithm)
                    .map(Cow::Owned)
                    .ok_or(ApiError::Unauthorized(
                        "token has no kid, and no single key of its algorithm can verify it",
                    ))
            }
            None => Err(not_accepted),
        }
    }
}

/// The checks a token signed with `algorithm` must pass under `rules`.
fn validation(rules: &ClaimRules, algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = rules.leeway_secs;
    // A token that is not valid yet is refused too, within the same leeway.
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if rules.audience.is_empty() {
        // Without a configured audience, a provider's `aud` (always there) is not ours to
        // judge; the README says to set JWT_AUDIENCE with a shared provider.
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rules.audience);
        required.push("aud");
    }
    if let Some(issuer) = &rules.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The 401 text for a token that failed verification.
fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token has expired",
        ErrorKind::ImmatureSignature => "token is not valid yet (nbf)",
        ErrorKind::InvalidSignature => "token signature is invalid",
        ErrorKind::InvalidAlgorithm => "token algorithm is not accepted",
        ErrorKind::InvalidAudience => "token audience (aud) is not accepted",
        ErrorKind::InvalidIssuer => "token issuer (iss) is not accepted",
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "aud" => "token has no aud claim",
            "iss" => "token has no iss claim",
            _ => "token has no exp claim",
        },
        _ => "token is malformed",
    }
}

/// Whether the token's header says `"alg": "none"` (an unsigned token).
fn declares_alg_none(token: &str) -> bool {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let Some(encoded) = token.split('.').next() else {
        return false;
    };
    URL_SAFE_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .ok()
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|header| {
            let alg = header.get("alg")?.as_str()?;
            Some(alg.eq_ignore_ascii_case("none"))
        })
        .unwrap_or(false)
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or(ApiError::Unauthorized(MISSING_TOKEN))?;
    // The scheme is case-insensitive (RFC 7235 §2.1): `BEARER`, `bearer` and `Bearer` alike.
    value
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .ok_or(ApiError::Unauthorized(
            "authorization header is not 'Bearer <token>'",
        ))
}

/// The caller of a job route: the `Authorization: Bearer` header, else the `access_token`
/// cookie (the demo page's, or the application's own). The header wins even when it is
/// invalid, so a bad token is reported rather than silently replaced by a cookie.
///
/// A browser attaches the cookie to requests that other sites make, so a cookie-authenticated
/// request that changes something must declare a JSON body (415 otherwise): a cross-site form
/// cannot, and a cross-site `fetch` that does needs a CORS preflight, which only an origin in
/// `CORS_ALLOW_ORIGINS` passes. The cookie's `SameSite=Strict` is the first line; this is the
/// second, for cookies set without it.
pub(crate) async fn user_identity<B>(
    auth: &Authenticator,
    request: &Request<B>,
) -> Result<Identity, ApiError> {
    if request.headers().contains_key(AUTHORIZATION) {
        return auth.authenticate(request.headers()).await;
    }
    let token = cookie_token(request.headers()).ok_or(ApiError::Unauthorized(MISSING_TOKEN))?;
    let identity = auth.verify(token).await?;
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        require_json_content_type(request.headers())?;
    }
    Ok(identity)
}

/// The stream's token: the `Authorization: Bearer` header, else (for `EventSource`, which
/// cannot send headers) the `access_token` query parameter, else the `access_token` cookie.
pub(crate) fn stream_token<B>(request: &Request<B>) -> Result<String, ApiError> {
    if request.headers().contains_key(AUTHORIZATION) {
        return bearer_token(request.headers()).map(str::to_owned);
    }
    if let Some(token) = query_param(request, "access_token")? {
        return Ok(token);
    }
    cookie_token(request.headers())
        .map(str::to_owned)
        .ok_or(ApiError::Unauthorized(MISSING_TOKEN))
}

/// The value of the first `access_token` cookie over every `Cookie` header, unless empty.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix("access_token="))
        .filter(|token| !token.is_empty())
}
