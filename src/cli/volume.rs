//! `vbd volume`: create, list, inspect and delete object-store volumes,
//! straight in the store (no running vbd needed).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::default_store_url;
use vbd::objstore::Store;
use vbd::runtime::runtime;
use vbd::size::parse_size;
use vbd::volume::object::admin;

#[derive(Args)]
pub(crate) struct StoreArg {
    /// Object store URL: file:///DIR or s3://BUCKET[/PREFIX] (S3 settings and
    /// credentials come from AWS_* variables or ~/.aws/credentials).
    /// Default: the embedded local store.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

impl StoreArg {
    fn url(&self) -> String {
        self.store.clone().unwrap_or_else(default_store_url)
    }

    fn open(&self) -> Result<Store> {
        let url = self.url();
        Store::open(&url).with_context(|| format!("opening store {url}"))
    }
}

/// `vbd volume` subcommands.
#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
    /// Create a volume (instant, whatever its size).
    Create {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        /// Size, e.g. 10G or 1T (a multiple of 4 KiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Show a volume's size, storage use and lock holder (as JSON).
    Info {
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
    /// Delete a volume and all its objects.
    Delete {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        /// Delete even if a writer lock is held (for a lock left by a lost machine).
        #[arg(long)]
        force: bool,
    },
}

/// Runs a `vbd volume` subcommand.
pub(crate) fn run(cmd: VolumeCmd) -> Result<()> {
    let rt = runtime();
    match cmd {
        VolumeCmd::Create { store, name, size } => {
            let d = rt.block_on(admin::create(&store.open()?, &name, size))?;
            println!(
                "created volume {} of {} bytes in {}",
                d.name,
                d.size,
                store.url()
            );
        }
        VolumeCmd::List { store } => {
            for d in rt.block_on(admin::list(&store.open()?))? {
                println!("{}\t{}", d.name, d.size);
            }
        }
        VolumeCmd::Info { store, name } => {
            let i = rt.block_on(admin::info(&store.open()?, &name))?;
            println!("{}", serde_json::to_string_pretty(&i)?);
        }
        VolumeCmd::Delete { store, name, force } => {
            rt.block_on(admin::delete(&store.open()?, &name, force))?;
            println!("deleted volume {name}");
        }
    }
    Ok(())
}
