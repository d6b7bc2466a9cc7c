//! A private S3 server (Garage, through `scripts/s3.sh`) for tests that stop and restart
//! it: its own ports and data folder, so the shared test server of `scripts/s3.sh up` and
//! the tests using it are never disturbed. Same bucket and test key as the shared one, so
//! the credentials in the environment work for both.

use std::path::PathBuf;
use std::process::Command;

use crate::free_port;

/// A Garage server started for one test; removed (data included) on drop.
pub struct S3Server {
    port: u16,
    rpc_port: u16,
    admin_port: u16,
    /// Its S3 endpoint, `http://127.0.0.1:<port>`.
    pub endpoint: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("s3.sh")
}

impl S3Server {
    /// Starts a server on free ports (`scripts/s3.sh up`) and waits until it answers.
    /// Panics with the script's output if it cannot start.
    pub fn start() -> S3Server {
        let port = free_port();
        let server = S3Server {
            port,
            rpc_port: free_port(),
            admin_port: free_port(),
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        server.script("up");
        server
    }

    /// `s3://<bucket>/<prefix>?endpoint=<this server>` plus extra query parameters
    /// (`extra` without the leading `&`, or empty).
    pub fn url(&self, bucket: &str, prefix: &str, extra: &str) -> String {
        let mut url = format!("s3://{bucket}/{prefix}?endpoint={}", self.endpoint);
        if !extra.is_empty() {
            url.push('&');
            url.push_str(extra);
        }
        url
    }

    /// Stops the server, keeping its data (`scripts/s3.sh stop`): an outage.
    pub fn stop(&self) {
        self.script("stop");
    }

    /// Starts it again on its data (`scripts/s3.sh start`) and waits until it answers.
    pub fn restart(&self) {
        self.script("start");
    }

    fn script(&self, verb: &str) {
        let out = Command::new("bash")
            .arg(script())
            .arg(verb)
            .env("TRAINYARD_S3_PORT", self.port.to_string())
            .env("TRAINYARD_S3_RPC_PORT", self.rpc_port.to_string())
            .env("TRAINYARD_S3_ADMIN_PORT", self.admin_port.to_string())
            .output()
            .unwrap_or_else(|e| panic!("running scripts/s3.sh {verb}: {e}"));
        assert!(
            out.status.success(),
            "scripts/s3.sh {verb} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("down")
            .env("TRAINYARD_S3_PORT", self.port.to_string())
            .env("TRAINYARD_S3_RPC_PORT", self.rpc_port.to_string())
            .env("TRAINYARD_S3_ADMIN_PORT", self.admin_port.to_string())
            .output();
    }
}
