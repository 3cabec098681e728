//! The browser client, embedded in the binary so that `confab serve` works
//! from any working directory. The sources live in `web/`.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// `web/index.html`.
pub const INDEX_HTML: &str = include_str!("../web/index.html");
/// `web/app.js`.
pub const APP_JS: &str = include_str!("../web/app.js");
/// `web/style.css`.
pub const STYLE_CSS: &str = include_str!("../web/style.css");

/// One embedded file with its content type. `no-cache` makes browsers
/// revalidate, so a new server version is picked up on reload.
pub(crate) fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
