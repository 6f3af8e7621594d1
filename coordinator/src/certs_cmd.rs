//! `coordinator certs`: a cluster CA and certificates for its coordinators and nodes, for
//! clusters without a PKI of their own.

use std::path::PathBuf;

use cluster_tls::issue::{self, Request};
use cluster_tls::Role;

/// What `certs` does.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Write a new cluster CA (`ca.pem`, `ca-key.pem`) into a folder. Keep `ca-key.pem`
    /// off the nodes: only `ca.pem` goes to every process.
    ///
    /// Example: coordinator certs init --out certs
    Init {
        /// Folder to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "llm-cluster CA")]
        name: String,
        /// Days valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate and key signed by the CA, for a coordinator or a node
    /// (`NAME.pem`, `NAME-key.pem`). A node's certificate must name every address it is
    /// dialed at (`--san`).
    ///
    /// Example: coordinator certs issue --ca certs --role node --name node-a
    ///          --san 10.0.0.5 --san node-a.internal --out certs
    Issue {
        /// The CA's folder (from `certs init`).
        #[arg(long)]
        ca: PathBuf,
        /// coordinator or node: what the holder may do.
        #[arg(long, value_parser = ["coordinator", "node"])]
        role: String,
        /// Common name: the node's id, or the coordinator's name; also a subject
        /// alternative name.
        #[arg(long)]
        name: String,
        /// Another address (IP) or DNS name the holder is reached at; repeatable.
        #[arg(long)]
        san: Vec<String>,
        /// Folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// Days valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// Runs it; returns what to print.
pub fn run(c: CertsCommand) -> cluster_tls::Result<String> {
    match c {
        CertsCommand::Init { out, name, days } => {
            let (cert, key) = issue::init_ca(&out, &name, days)?;
            Ok(format!(
                "wrote {} and {} (keep the key off the nodes)\n",
                cert.display(),
                key.display()
            ))
        }
        CertsCommand::Issue {
            ca,
            role,
            name,
            san,
            out,
            days,
        } => {
            let r = Request {
                role: Role::parse(&role)?,
                name,
                sans: san,
                days,
            };
            let (cert, key) = issue::issue(&ca, &r, &out)?;
            Ok(format!(
                "wrote {} and {} ({} certificate)\n",
                cert.display(),
                key.display(),
                r.role
            ))
        }
    }
}
