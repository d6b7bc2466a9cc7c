//! `trainyard certs init`: a development CA and certificates for TLS and mutual TLS.

use anyhow::Result;
use trainyard_auth::certs::{self, CertsError, InitOptions};

use crate::args::{CertsArgs, CertsCommand};
use crate::error::bad_input;

/// Runs `trainyard certs ...`.
pub fn run(args: CertsArgs) -> Result<i32> {
    let CertsCommand::Init(a) = args.command;
    let generated = certs::init(&InitOptions {
        dir: a.out.clone(),
        hosts: a.hosts.clone(),
        force: a.force,
        days: a.days,
    })
    .map_err(|e| match e {
        CertsError::InvalidHost { .. } => bad_input(format!("--host: {e}")),
        CertsError::InvalidDays { .. } => bad_input(format!("--days: {e}")),
        CertsError::AlreadyExists { .. } => bad_input(format!("--out: {e} (pass --force)")),
        other => anyhow::Error::new(other),
    })?;
    let dir = generated.dir.display();
    println!("wrote a development CA and certificates to {dir}:");
    for f in &generated.files {
        println!("  {}", f.display());
    }
    println!(
        "\ncoordinator:  trainyard coordinator --tls-cert {dir}/{cc} --tls-key {dir}/{ck} \
         [--tls-client-ca {dir}/{ca}]\n\
         worker:       trainyard worker --coordinator https://HOST:7800 --tls-ca {dir}/{ca} \
         [--tls-cert {dir}/{wc} --tls-key {dir}/{wk}]\n\
         client:       trainyard --coordinator https://HOST:7800 --tls-ca {dir}/{ca} jobs\n\
         Keep the *-key.pem files secret; use your own PKI in production.",
        cc = certs::COORDINATOR_CERT,
        ck = certs::COORDINATOR_KEY,
        ca = certs::CA_CERT,
        wc = certs::WORKER_CERT,
        wk = certs::WORKER_KEY,
    );
    Ok(0)
}
