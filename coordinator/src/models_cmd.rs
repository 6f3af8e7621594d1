//! `coordinator models`: the admin API (`coordinator serve --admin-key`) from the command
//! line: list, load, unload and switch the models a running coordinator serves.

use std::time::Duration;

use crate::error::{CoordError, Result};

/// Options of `coordinator models`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  export LLMC_ADMIN_KEY=...                 # the key given to `coordinator serve --admin-key`
  coordinator models list
  coordinator models load gemma-3-270m-q4_k_m.gguf
  coordinator models unload SmolLM2-135M-Instruct.Q4_1
  coordinator models switch SmolLM2-135M-Instruct.Q4_1 gemma-3-270m-q4_k_m.gguf")]
pub struct ModelsArgs {
    /// The coordinator's HTTP address (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The admin key.
    #[arg(long, env = "LLMC_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: String,
    /// What to do.
    #[command(subcommand)]
    pub action: ModelsAction,
}

/// What `coordinator models` does.
#[derive(Debug, clap::Subcommand)]
pub enum ModelsAction {
    /// The models served: id, file, plan epoch, stages.
    List,
    /// Load a GGUF file (a name in the models folder) beside the models served.
    Load {
        /// The file name, e.g. model.gguf.
        file: String,
    },
    /// Unload a model: its running requests finish, then every node frees its memory.
    Unload {
        /// The model's id (its file name without `.gguf`).
        id: String,
    },
    /// Serve another model instead of one: the new one loaded first when both fit, else
    /// the old one unloaded first.
    Switch {
        /// The id of the model served now.
        from: String,
        /// The file name of the model to serve instead.
        to: String,
    },
}

/// Runs the call; returns the coordinator's answer, pretty-printed.
pub fn run(a: &ModelsArgs) -> Result<String> {
    let base = a.url.trim_end_matches('/');
    if !base.starts_with("http://") {
        return Err(CoordError::Config(format!(
            "--url {base}: give a plain http:// address of the coordinator"
        )));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let auth = format!("Bearer {}", a.admin_key);
    let url = format!("{base}/admin/models");
    let fail = |e: ureq::Error| CoordError::Config(format!("{url}: {e}"));
    let mut reply = match &a.action {
        ModelsAction::List => agent.get(&url).header("authorization", &auth).call(),
        ModelsAction::Unload { id } => agent
            .delete(&format!("{url}/{id}"))
            .header("authorization", &auth)
            .call(),
        ModelsAction::Load { file } => agent
            .post(&url)
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(serde_json::json!({ "file": file }).to_string().as_str()),
        ModelsAction::Switch { from, to } => agent
            .post(&format!("{url}/switch"))
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .send(
                serde_json::json!({ "from": from, "to": to })
                    .to_string()
                    .as_str(),
            ),
    }
    .map_err(fail)?;
    let status = reply.status().as_u16();
    let body = reply.body_mut().read_to_string().map_err(fail)?;
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    match status {
        200..=299 => Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&v).unwrap_or_default()
        )),
        404 if v.is_string() => Err(CoordError::Config(format!(
            "{url}: 404; is the admin API on (`coordinator serve --admin-key`)?"
        ))),
        _ => Err(CoordError::Config(format!(
            "{status}: {}",
            v["error"]["message"]
                .as_str()
                .map_or_else(|| v.to_string(), str::to_string)
        ))),
    }
}
