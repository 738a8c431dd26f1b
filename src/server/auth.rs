//! JWT bearer authentication: HMAC-signed tokens whose `sub` is the user id.

use std::time::Duration;

use hyper::header::{HeaderMap, AUTHORIZATION, COOKIE};
use hyper::{Method, Request};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, MISSING_TOKEN};
use super::request::{query_param, require_json_content_type};

/// The `role` claim that allows `POST /ai/events/publish`.
pub const PUBLISHER_ROLE: &str = "publisher";
/// Clock skew tolerated on `exp`, between the token issuer and this server.
const EXPIRY_LEEWAY_SECS: u64 = 30;

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

/// Who a verified token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub user_id: String,
    /// Whether the token carries the publisher role.
    pub publisher: bool,
}

/// Signs and verifies tokens with one secret and one algorithm, both from configuration.
pub struct Authenticator {
    algorithm: Algorithm,
    encoding_key: EncodingKey,
    decoding_key: DecodingKey,
    validation: Validation,
}

impl Authenticator {
    /// An authenticator for `secret` that accepts only `algorithm` (an HMAC one).
    pub fn new(secret: &[u8], algorithm: Algorithm) -> Self {
        // The accepted algorithm is fixed here, so a token's own `alg` (say `none`, or an
        // asymmetric one keyed with our secret) can never choose how it is checked.
        let mut validation = Validation::new(algorithm);
        validation.leeway = EXPIRY_LEEWAY_SECS;
        // A token that is not valid yet is refused too, within the same leeway.
        validation.validate_nbf = true;
        Authenticator {
            algorithm,
            encoding_key: EncodingKey::from_secret(secret),
            decoding_key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// A token for `user_id`, valid for `ttl`, with the publisher role if asked.
    pub fn issue(&self, user_id: &str, publisher: bool, ttl: Duration) -> String {
        let claims = Claims {
            sub: Some(user_id.to_owned()),
            exp: crate::time::unix_seconds() + ttl.as_secs(),
            role: publisher.then(|| PUBLISHER_ROLE.to_owned()),
        };
        encode(&Header::new(self.algorithm), &claims, &self.encoding_key)
            .expect("HMAC signing of serializable claims cannot fail")
    }

    /// Verifies the `Authorization: Bearer` header.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        self.verify(bearer_token(headers)?)
    }

    /// Verifies one token string: signature, algorithm, expiry and a non-empty `sub`.
    pub fn verify(&self, token: &str) -> Result<Identity, ApiError> {
        use jsonwebtoken::errors::ErrorKind;
        let claims = decode::<Claims>(token, &self.decoding_key, &self.validation)
            .map_err(|error| {
                ApiError::Unauthorized(match error.kind() {
                    ErrorKind::ExpiredSignature => "token has expired",
                    ErrorKind::ImmatureSignature => "token is not valid yet (nbf)",
                    ErrorKind::InvalidSignature => "token signature is invalid",
                    ErrorKind::InvalidAlgorithm => "token algorithm is not accepted",
                    ErrorKind::MissingRequiredClaim(_) => "token has no exp claim",
                    _ => "token is malformed",
                })
            })?
            .claims;
        // A blank `sub` names nobody: refused like a missing one.
        let user_id = claims
            .sub
            .filter(|sub| !sub.trim().is_empty())
            .ok_or(ApiError::Unauthorized("token has no sub claim"))?;
        Ok(Identity {
            user_id,
            publisher: claims.role.as_deref() == Some(PUBLISHER_ROLE),
        })
    }
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
pub(crate) fn user_identity<B>(
    auth: &Authenticator,
    request: &Request<B>,
) -> Result<Identity, ApiError> {
    if request.headers().contains_key(AUTHORIZATION) {
        return auth.authenticate(request.headers());
    }
    let token = cookie_token(request.headers()).ok_or(ApiError::Unauthorized(MISSING_TOKEN))?;
    let identity = auth.verify(token)?;
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
