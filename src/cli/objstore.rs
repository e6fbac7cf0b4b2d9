//! `vbd objstore serve`: a directory served over the S3 protocol (the
//! embedded endpoint other nodes and the tests talk to).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

/// `vbd objstore` subcommands.
#[derive(Subcommand)]
pub(crate) enum ObjstoreCmd {
    /// Serve a directory over the S3 protocol on loopback (or ADDR).
    Serve {
        /// Directory holding the buckets (one subdirectory each).
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on; port 0 picks a free port (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Buckets to create if missing.
        #[arg(long, default_value = "vbd")]
        bucket: Vec<String>,
        /// AWS-style credentials file whose [default] profile holds the key
        /// pair clients must sign with; default: AWS_ACCESS_KEY_ID and
        /// AWS_SECRET_ACCESS_KEY from the environment.
        #[arg(long)]
        credentials: Option<PathBuf>,
    },
}

/// Runs a `vbd objstore` subcommand.
pub(crate) fn run(cmd: ObjstoreCmd) -> Result<()> {
    match cmd {
        ObjstoreCmd::Serve {
            dir,
            listen,
            bucket,
            credentials,
        } => serve_s3(dir, listen, bucket, credentials),
    }
}

#[cfg(feature = "s3-server")]
fn serve_s3(
    dir: PathBuf,
    listen: SocketAddr,
    buckets: Vec<String>,
    credentials: Option<PathBuf>,
) -> Result<()> {
    use anyhow::{Context, bail};
    use tracing::info;
    use vbd::objstore::credentials::{self, Credentials};
    use vbd::objstore::server::{ServeConfig, bind};
    use vbd::runtime::runtime;
    use vbd::server::signals;

    let credentials = match credentials {
        Some(path) => credentials::read(&path, "default")?,
        None => match (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            (Ok(a), Ok(s)) if !a.is_empty() && !s.is_empty() => Credentials {
                access_key_id: a,
                secret_access_key: s,
                session_token: None,
            },
            _ => bail!(
                "no credentials for the S3 endpoint: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                 or pass --credentials FILE (an AWS credentials file with a [default] profile)"
            ),
        },
    };
    let cfg = ServeConfig {
        dir,
        listen,
        credentials,
        buckets,
    };
    signals::block_termination().context("blocking SIGTERM/SIGINT")?;
    let rt = runtime();
    let endpoint = rt.block_on(bind(&cfg))?;
    println!("http://{}", endpoint.addr);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(endpoint.serve(async {
        let _ = rx.await;
    }));
    let sig = signals::wait_for_termination().context("waiting for SIGTERM/SIGINT")?;
    info!(signal = sig, "received termination signal");
    let _ = tx.send(());
    let _ = rt.block_on(server);
    Ok(())
}

#[cfg(not(feature = "s3-server"))]
fn serve_s3(_: PathBuf, _: SocketAddr, _: Vec<String>, _: Option<PathBuf>) -> Result<()> {
    anyhow::bail!("this vbd was built without the s3-server feature; rebuild with default features")
}
