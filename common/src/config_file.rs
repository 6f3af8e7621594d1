//! Config files: `serve --config FILE` reads a TOML file whose keys are the command's flags,
//! without the dashes (`listen = "0.0.0.0:7070"` for `--listen 0.0.0.0:7070`).
//!
//! The file is laid *under* the command line: [`layer`] turns each key that was not given as a
//! flag (or through the flag's environment variable) into that flag, and the command line is
//! then parsed as usual. So every flag has a key by construction, a flag always wins over the
//! file, defaults stay where clap documents them, and a value from the file meets the same
//! parser and the same `validate()` as one typed on the command line.
//!
//! What the file may not do, it is told with the file's name and the line:
//! - a key that is no flag of the command (or a hidden, testing-only one);
//! - a table, or a list for a flag taken once;
//! - a value that the flag's parser refuses (the parser's rule is quoted);
//! - `true`/`false` on a switch is a boolean, not a string.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::ContextKind;
use clap::parser::ValueSource;
use clap::{ArgAction, Command};
use toml::Spanned;

use crate::error::{Error, Result};

/// The flag that names the file; each command that takes one declares it.
pub const FLAG: &str = "config";

/// One key of the file, where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file.
    pub path: PathBuf,
    /// 1-based line of the key's value.
    pub line: usize,
    /// The key.
    pub key: String,
}

/// The command line with the config file's keys inserted as flags, and where each came from.
#[derive(Debug, Clone, Default)]
pub struct Layered {
    /// What to parse: the original arguments with the file's flags after the subcommand.
    pub argv: Vec<OsString>,
    /// For each inserted flag (its long name), where in the file it was.
    pub origins: Vec<Origin>,
}

impl Layered {
    /// Names the file and line of a parse error caused by one of the file's values (clap
    /// names the flag; the user wrote a key). Other errors are returned as they are.
    pub fn explain(&self, err: &clap::Error) -> Option<String> {
        let arg = match err.get(ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::String(s)) => s.clone(),
            _ => return None,
        };
        let long = arg
            .strip_prefix("--")?
            .split([' ', '='])
            .next()
            .unwrap_or_default()
            .to_string();
        let o = self.origins.iter().find(|o| o.key == long)?;
        let rendered = err.render().to_string();
        let first = rendered.lines().next().unwrap_or_default();
        let why = first.strip_prefix("error: ").unwrap_or(first);
        Some(format!(
            "{}, line {}: `{}`: {why}",
            o.path.display(),
            o.line,
            o.key
        ))
    }
}

/// Inserts the keys of the file named by `--config` (on whichever subcommand was chosen) into
/// `argv`. Without `--config`, or when the command line does not parse (help, version, a
/// mistake clap will report itself), `argv` comes back unchanged.
pub fn layer(cmd: &Command, argv: Vec<OsString>) -> Result<Layered> {
    let mut cmd = cmd.clone().ignore_errors(true);
    cmd.build();
    let unchanged = |argv| {
        Ok(Layered {
            argv,
            origins: Vec::new(),
        })
    };
    let Ok(matches) = cmd.clone().try_get_matches_from(&argv) else {
        return unchanged(argv);
    };
    let Some((name, sub_matches)) = matches.subcommand() else {
        return unchanged(argv);
    };
    let Ok(Some(path)) = sub_matches.try_get_one::<PathBuf>(FLAG) else {
        return unchanged(argv);
    };
    let Some(sub) = cmd.find_subcommand(name) else {
        return unchanged(argv);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))?;
    let (flags, origins) = flags_from(sub, sub_matches, path, &text)?;
    // After the subcommand's name, before what the user typed (which is parsed the same way
    // whichever comes first, and never collides: given flags are skipped).
    let at = argv
        .iter()
        .position(|a| a == name)
        .map_or(argv.len(), |i| i + 1);
    let mut out = argv;
    out.splice(at..at, flags);
    Ok(Layered { argv: out, origins })
}

/// Why a command line with its config file did not parse.
#[derive(Debug)]
pub enum Refused {
    /// The file could not be read, or a key of it is refused (the message names the line).
    File(String),
    /// Clap's own verdict on the command line (also `--help` and `--version`).
    Args(clap::Error),
}

/// Parses `argv` with the file of `--config` laid under it.
pub fn try_parse_from<P: clap::Parser>(argv: Vec<OsString>) -> std::result::Result<P, Refused> {
    let layered = layer(&P::command(), argv).map_err(|e| Refused::File(e.to_string()))?;
    P::try_parse_from(&layered.argv).map_err(|e| match layered.explain(&e) {
        Some(m) => Refused::File(m),
        None => Refused::Args(e),
    })
}

/// Parses this process's command line, with the file of `--config` laid under it; exits
/// with clap's usual message (or one naming the file's line) when it does not parse.
pub fn parse<P: clap::Parser>() -> P {
    match try_parse_from::<P>(std::env::args_os().collect()) {
        Ok(p) => p,
        Err(Refused::Args(e)) => e.exit(),
        Err(Refused::File(m)) => {
            eprintln!("{}: error: {m}", P::command().get_name());
            std::process::exit(2);
        }
    }
}

/// The flags the file's keys stand for, skipping those given on the command line.
fn flags_from(
    sub: &Command,
    given: &clap::ArgMatches,
    path: &Path,
    text: &str,
) -> Result<(Vec<OsString>, Vec<Origin>)> {
    let table: BTreeMap<String, Spanned<toml::Value>> = toml::from_str(text)
        .map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))?;
    let line_of = |s: &Spanned<toml::Value>| text[..s.span().start].matches('\n').count() + 1;
    let mut flags = Vec::new();
    let mut origins = Vec::new();
    for (key, value) in &table {
        let line = line_of(value);
        let at = |msg: String| Error::Config(format!("{}, line {line}: {msg}", path.display()));
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(key) && settable(a))
            .ok_or_else(|| at(unknown(sub, key)))?;
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let v = value.get_ref();
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => match v {
                toml::Value::Boolean(b) => {
                    if *b == matches!(arg.get_action(), ArgAction::SetTrue) {
                        flags.push(OsString::from(format!("--{key}")));
                    }
                }
                _ => return Err(at(format!("`{key}` is a switch: true or false"))),
            },
            ArgAction::Set => flags.push(flag(key, scalar(key, v).map_err(at)?)),
            ArgAction::Append => match v {
                toml::Value::Array(items) => {
                    for item in items {
                        flags.push(flag(key, scalar(key, item).map_err(at)?));
                    }
                }
                _ => flags.push(flag(key, scalar(key, v).map_err(at)?)),
            },
            _ => return Err(at(format!("`{key}` cannot be set in a file"))),
        }
        origins.push(Origin {
            path: path.to_path_buf(),
            line,
            key: key.clone(),
        });
    }
    Ok((flags, origins))
}

/// Flags a file may set: not hidden (testing only), not help or version, not `--config`.
fn settable(a: &clap::Arg) -> bool {
    !a.is_hide_set()
        && a.get_id() != FLAG
        && !matches!(
            a.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

fn flag(key: &str, value: String) -> OsString {
    OsString::from(format!("--{key}={value}"))
}

/// A value as the command line would spell it.
fn scalar(key: &str, v: &toml::Value) -> std::result::Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) => Err(format!("`{key}` takes one value, not a list")),
        toml::Value::Table(_) => Err(format!(
            "`{key}` is a table; keys are the flags' names, at the top level"
        )),
    }
}

/// The refusal of an unknown key, with the nearest known one.
fn unknown(sub: &Command, key: &str) -> String {
    let known: Vec<&str> = sub
        .get_arguments()
        .filter(|a| settable(a))
        .filter_map(|a| a.get_long())
        .collect();
    let nearest = known
        .iter()
        .map(|k| (edit_distance(k, key), *k))
        .min()
        .filter(|(d, _)| *d <= 3)
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default();
    format!(
        "unknown key `{key}`{nearest}; the keys are `{}`'s flags: {}",
        sub.get_bin_name().unwrap_or_else(|| sub.get_name()),
        known.join(", ")
    )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Parser};

    #[derive(Parser, Debug, PartialEq)]
    #[command(name = "tool")]
    enum Tool {
        Serve {
            #[arg(long)]
            config: Option<PathBuf>,
            #[arg(long, default_value = "127.0.0.1:7070")]
            listen: std::net::SocketAddr,
            #[arg(long)]
            model: PathBuf,
            #[arg(long, value_delimiter = ',')]
            nodes: Vec<String>,
            #[arg(long)]
            quiet: bool,
            #[arg(long, default_value_t = 64)]
            max_sessions: usize,
            #[arg(long, hide = true)]
            secret_testing_knob: Option<u32>,
        },
    }

    fn parse(file: &str, args: &[&str]) -> std::result::Result<Tool, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, file).expect("write");
        let mut argv: Vec<OsString> = ["tool", "serve", "--config"]
            .iter()
            .map(OsString::from)
            .collect();
        argv.push(path.clone().into());
        argv.extend(args.iter().map(OsString::from));
        try_parse_from::<Tool>(argv).map_err(|e| match e {
            Refused::File(m) => m.replace(&path.display().to_string(), "FILE"),
            Refused::Args(e) => e.to_string(),
        })
    }

    fn serve(t: Tool) -> (std::net::SocketAddr, PathBuf, Vec<String>, bool, usize) {
        let Tool::Serve {
            listen,
            model,
            nodes,
            quiet,
            max_sessions,
            ..
        } = t;
        (listen, model, nodes, quiet, max_sessions)
    }

    #[test]
    fn keys_fill_flags_and_flags_win() {
        let file = "listen = \"0.0.0.0:9000\"\nmodel = \"m.gguf\"\nnodes = [\"a:1\", \"b:2\"]\nquiet = true\nmax-sessions = 8\n";
        let t = serve(parse(file, &[]).expect("parse"));
        assert_eq!(
            t,
            (
                "0.0.0.0:9000".parse().expect("addr"),
                "m.gguf".into(),
                vec!["a:1".into(), "b:2".into()],
                true,
                8
            )
        );
        // every flag given on the command line wins over its key, lists included
        let t = serve(
            parse(
                file,
                &[
                    "--listen",
                    "127.0.0.1:1",
                    "--nodes=c:3",
                    "--max-sessions",
                    "2",
                ],
            )
            .expect("parse"),
        );
        assert_eq!(t.0, "127.0.0.1:1".parse().expect("addr"));
        assert_eq!(t.2, vec!["c:3".to_string()]);
        assert_eq!(t.4, 2);
        // what neither gives keeps clap's default
        let t = serve(parse("model = \"m.gguf\"\n", &[]).expect("parse"));
        assert_eq!(t.0, "127.0.0.1:7070".parse().expect("addr"));
        assert!(!t.3);
        // a required flag may come from the file alone, or from the command line alone
        let t = serve(parse("", &["--model", "x.gguf"]).expect("parse"));
        assert_eq!(t.1, PathBuf::from("x.gguf"));
    }

    fn refusal(file: &str) -> String {
        match parse(file, &[]) {
            Err(m) => m,
            Ok(t) => panic!("expected a refusal, got {t:?}"),
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_line_and_the_rule() {
        let m = refusal("model = \"m.gguf\"\n\nlissen = \"0.0.0.0:1\"\n");
        assert!(m.contains("line 3"), "{m}");
        assert!(m.contains("unknown key `lissen`"), "{m}");
        assert!(m.contains("did you mean `listen`"), "{m}");
        // hidden, testing-only flags and the file's own flag are not keys
        assert!(refusal("secret-testing-knob = 1\n").contains("unknown key"));
        assert!(refusal("config = \"other.toml\"\n").contains("unknown key"));
        let m = refusal("model = \"m.gguf\"\nlisten = \"not an address\"\n");
        assert!(m.contains("line 2"), "{m}");
        assert!(m.contains("`listen`"), "{m}");
        assert!(m.contains("invalid socket address"), "{m}");
        let m = refusal("model = \"m.gguf\"\nmax-sessions = -4\n");
        assert!(m.contains("line 2") && m.contains("`max-sessions`"), "{m}");
        let m = refusal("quiet = \"yes\"\n");
        assert!(m.contains("switch"), "{m}");
        let m = refusal("model = [\"a\", \"b\"]\n");
        assert!(m.contains("one value"), "{m}");
        let m = refusal("[listen]\nport = 1\n");
        assert!(m.contains("table"), "{m}");
        // a syntax error names the line too (toml's own message)
        let m = refusal("model = \"m.gguf\nquiet = true\n");
        assert!(m.contains("line 1"), "{m}");
    }

    #[test]
    fn no_file_leaves_the_command_line_alone() {
        let cmd = Command::new("t").subcommand(
            Command::new("serve").arg(
                Arg::new(FLAG)
                    .long(FLAG)
                    .value_parser(clap::value_parser!(PathBuf)),
            ),
        );
        let argv: Vec<OsString> = vec!["t".into(), "serve".into()];
        assert_eq!(layer(&cmd, argv.clone()).expect("layer").argv, argv);
        let missing: Vec<OsString> = vec![
            "t".into(),
            "serve".into(),
            "--config".into(),
            "/nonexistent/x.toml".into(),
        ];
        match layer(&cmd, missing) {
            Err(Error::Config(m)) => assert!(m.contains("/nonexistent/x.toml"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("listen", "lissen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("nodes", "nodes"), 0);
    }
}
