//! The dashboard, compiled into the binary: no separate web server, no CDN, works offline.
//! Plain ES modules and canvas, so there is no build step (see `docs/dashboard.md`).

/// `(content type, bytes)` of the asset at `path`, if there is one.
pub fn get(path: &str) -> Option<(&'static str, &'static [u8])> {
    Some(match path {
        "/" | "/index.html" => (
            "text/html; charset=utf-8",
            include_bytes!("../assets/index.html"),
        ),
        "/dashboard.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("../assets/dashboard.js"),
        ),
        "/fleet-client.js" => (
            "text/javascript; charset=utf-8",
            include_bytes!("../assets/fleet-client.js"),
        ),
        "/dashboard.css" => (
            "text/css; charset=utf-8",
            include_bytes!("../assets/dashboard.css"),
        ),
        _ => return None,
    })
}
