//! `GET /`: the demo page, one HTML file with its script and style inline, compiled in.
//!
//! The page's script and style are allowed by a nonce drawn for each response, so the
//! content security policy allows no other inline code, no inline event handler and nothing
//! from another origin. The page is told two booleans, never anything the client sent:
//! whether the server is in development mode, and whether the request carries a valid
//! `access_token` cookie, so that it neither offers a login the server refuses nor asks for
//! a stream that would be refused (each refusal is an error in the browser's console).

use bytes::Bytes;
use hyper::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Request, Response};

use crate::server::auth::user_identity;
use crate::server::request::RequestBody;
use crate::server::response::{full_response, ResponseBody};
use crate::server::state::AppState;

/// The page: HTML, CSS and plain JavaScript, with no build step and nothing fetched elsewhere.
const PAGE: &str = include_str!("demo.html");
/// Where the page names its nonce (in its `<script>` and `<style>` tags).
const NONCE_PLACEHOLDER: &str = "__CSP_NONCE__";
/// Where the page is told whether the server is in development mode (`true` or `false`).
const DEVELOPMENT_MODE_PLACEHOLDER: &str = "__DEVELOPMENT_MODE__";
/// Where the page is told whether the request came with a valid session cookie.
const SESSION_PLACEHOLDER: &str = "__SESSION__";

/// Serves the demo page with this response's nonce and its security headers.
pub(in crate::server) async fn page(
    state: &AppState,
    request: &Request<impl RequestBody>,
) -> Response<ResponseBody> {
    let nonce = crate::random::hex_token(16);
    let session = user_identity(&state.auth, request).await.is_ok();
    let html = PAGE
        .replace(NONCE_PLACEHOLDER, &nonce)
        .replace(
            DEVELOPMENT_MODE_PLACEHOLDER,
            bool_text(state.config.dev_sessions()),
        )
        .replace(SESSION_PLACEHOLDER, bool_text(session));
    let mut response = full_response(Bytes::from(html));
    let policy = format!(
        "default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Always revalidated, so a new binary's page replaces the old one at once.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&policy).expect("a hex nonce makes a valid header value"),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

fn bool_text(value: bool) -> &'static str {
    if value {
        "true"
    } else {
        "false"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pages_own_script_and_style_tags_carry_the_nonce() {
        assert_eq!(PAGE.matches(NONCE_PLACEHOLDER).count(), 2);
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(PAGE.contains(&format!("<script nonce=\"{NONCE_PLACEHOLDER}\">")));
        assert!(PAGE.contains(&format!("<style nonce=\"{NONCE_PLACEHOLDER}\">")));
    }

    #[test]
    fn the_page_has_no_inline_event_handler_and_loads_nothing_from_elsewhere() {
        let lower = PAGE.to_ascii_lowercase();
        // An attribute such as ` onclick=`: a space, `on`, letters, `=`.
        let handler = lower.match_indices(" on").find(|(at, _)| {
            let rest = &lower[at + 3..];
            let letters = rest.len()
                - rest
                    .trim_start_matches(|c: char| c.is_ascii_lowercase())
                    .len();
            letters > 0 && rest[letters..].starts_with('=')
        });
        assert_eq!(handler, None);
        assert!(!lower.contains("http://") && !lower.contains("https://"));
        assert!(!lower.contains(" src="));
    }

    #[tokio::test]
    async fn each_response_has_its_own_nonce() {
        let nonce_of = |response: Response<ResponseBody>| {
            let policy = response.headers()[CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap();
            let start = policy.find("'nonce-").unwrap() + "'nonce-".len();
            policy[start..start + 32].to_owned()
        };
        let state = AppState::new(
            crate::config::Config::with_secret("page-test"),
            std::sync::Arc::new(crate::events::EventBus::new()),
        );
        let request = || Request::new(http_body_util::Empty::<Bytes>::new());
        assert_ne!(
            nonce_of(page(&state, &request()).await),
            nonce_of(page(&state, &request()).await)
        );
    }
}
