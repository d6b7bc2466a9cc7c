//! `trainyard auth add-user|add-worker|remove|list`: the coordinator's auth file.

use std::path::Path;

use anyhow::{Context, Result};
use trainyard_auth::auth_file::{self, AuthError, NewEntry};

use crate::args::{AuthArgs, AuthCommand};
use crate::error::bad_input;

/// Bad names, existing or unknown entries and broken files are the user's to fix
/// (exit code 2); I/O failures are not.
fn classify(e: AuthError) -> anyhow::Error {
    match e {
        AuthError::Read { .. } | AuthError::Write { .. } | AuthError::Random(_) => {
            anyhow::Error::new(e)
        }
        other => bad_input(other.to_string()),
    }
}

/// Writes a token to `path`, readable by its owner only.
fn write_token(path: &Path, token: &str) -> Result<()> {
    trainyard_auth::files::write_atomic(path, format!("{token}\n").as_bytes(), 0o600)
        .with_context(|| format!("--token-out: cannot write {}", path.display()))
}

/// Adds `entry`, prints its token once on stdout (and to `token_out`), and how to use it.
fn add(
    file: &Path,
    entry: &NewEntry,
    what: &str,
    token_out: Option<&Path>,
    usage: &str,
) -> Result<()> {
    let token = auth_file::add(file, entry).map_err(classify)?;
    if let Some(out) = token_out {
        write_token(out, &token)?;
    }
    eprintln!(
        "added {what} to {}; the token (shown once, only its hash is stored):",
        file.display()
    );
    println!("{token}");
    eprintln!("use it with: {usage}");
    Ok(())
}

/// Runs `trainyard auth ...`.
pub fn run(args: AuthArgs) -> Result<i32> {
    let file = &args.auth_file;
    match args.command {
        AuthCommand::AddUser {
            name,
            role,
            token_out,
        } => {
            let role =
                auth_file::parse_user_role(&role).map_err(|r| bad_input(format!("--role: {r}")))?;
            let entry = NewEntry::User {
                name: name.clone(),
                role,
            };
            let what = format!("{role} {name:?}");
            let usage = "TRAINYARD_TOKEN=<token> trainyard jobs  (or --token-file)";
            add(file, &entry, &what, token_out.as_deref(), usage)?;
        }
        AuthCommand::AddWorker { name, token_out } => {
            let entry = NewEntry::Worker { name: name.clone() };
            let what = format!("join token {name:?}");
            let usage = "trainyard worker --join-token-file FILE  (or TRAINYARD_JOIN_TOKEN)";
            add(file, &entry, &what, token_out.as_deref(), usage)?;
        }
        AuthCommand::Remove { name } => {
            auth_file::remove(file, &name).map_err(classify)?;
            eprintln!(
                "removed {name:?} from {}; restart the coordinator to revoke the token",
                file.display()
            );
        }
        AuthCommand::List => {
            let mut table = comfy_table::Table::new();
            table.load_style(comfy_table::presets::NOTHING);
            table.set_header(["NAME", "ROLE"]);
            for p in auth_file::list(file).map_err(classify)? {
                table.add_row([p.name, p.role.to_string()]);
            }
            println!("{table}");
        }
    }
    Ok(0)
}
