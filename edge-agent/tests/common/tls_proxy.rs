//! nginx terminating TLS in front of a hub, with a certificate for `localhost` from a private CA
//! made for the test by openssl.

use std::time::Duration;

use super::{Hub, wait_until};

/// nginx terminating TLS with a certificate from a private CA, in front of the hub.
pub struct TlsProxy {
    dir: tempfile::TempDir,
    pub port: u16,
    child: std::process::Child,
}

impl TlsProxy {
    pub fn start(hub: &Hub) -> TlsProxy {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "hub.key",
            "-out",
            "hub.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(d.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "hub.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "hub.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conf = format!(
            r#"pid {d}/nginx.pid;
error_log {d}/error.log warn;
daemon off;
# One process: killing it leaves no orphaned worker behind.
master_process off;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {d}/hub.pem;
        ssl_certificate_key {d}/hub.key;
        location /ws {{
            proxy_pass http://{hub};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Authorization $http_authorization;
            proxy_read_timeout 75s;
        }}
    }}
}}
"#,
            d = d.display(),
            hub = hub.addr
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new("nginx")
            .args(["-p"])
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx is installed");
        wait_until("nginx", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        TlsProxy { dir, port, child }
    }

    /// The private CA's certificate, for the agent's `hub.ca_file`.
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
