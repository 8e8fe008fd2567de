//! Synchrony's configuration key space, resolved into command-line flags before clap parses.
//!
//! Every flag of a subcommand has a dotted key: `synchrony.` + the flag's name with dots for
//! dashes (`--flush-window-ms` → `synchrony.flush.window.ms`), except where Synchrony named it
//! otherwise (`jwt.public.key`, `cluster.join.type`, ...). A key's value may come from, highest
//! first:
//!
//! 1. the flag itself on the command line;
//! 2. a `-Dkey=value` argument (as a JVM launcher would pass it);
//! 3. the environment: the dotted key as a variable name (how Confluence passes it), then its
//!    UPPER_SNAKE form (`SYNCHRONY_PORT`), then the `reza.*` / `REZA_*` aliases;
//! 4. a properties file (`key=value` lines) named by `--properties-file`,
//!    `-Dsynchrony.properties.file`, or `SYNCHRONY_PROPERTIES_FILE`;
//! 5. the flag's default.
//!
//! Values found in 2–4 become flags for clap, so that clap validates every value the same way
//! and a bad one is reported with the key and where it came from. JVM-only arguments and the
//! trailing `synchrony.core sql` are dropped with a warning each. Warnings are collected and
//! logged once tracing is up.

use std::collections::HashMap;

use clap::Command;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    CommandLine,
    SystemProperty(String),
    Environment(String),
    PropertiesFile(String),
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::CommandLine => f.write_str("command line"),
            Source::SystemProperty(k) => write!(f, "-D{k}"),
            Source::Environment(k) => write!(f, "environment {k}"),
            Source::PropertiesFile(p) => write!(f, "properties file {p}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// One known key of a subcommand.
#[derive(Debug, Clone)]
pub struct Key {
    pub key: String,
    /// The clap argument id and long flag.
    pub long: String,
    pub env: Option<String>,
    pub secret: bool,
    /// A boolean switch (`--flag`, no value).
    pub switch: bool,
}

/// The outcome of resolving: arguments for clap and what was learned on the way.
#[derive(Debug, Default)]
pub struct Resolved {
    pub args: Vec<String>,
    pub warnings: Vec<String>,
    /// The unknown keys among the warnings (fatal with `synchrony.config.strict`).
    pub unknown: Vec<String>,
    /// (key, value, source) of every value taken from outside the command line.
    pub taken: Vec<(Key, String, Source)>,
    pub keys: Vec<Key>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyspaceError {
    #[error("{key} (from {origin}): {message}")]
    BadValue {
        key: String,
        origin: Source,
        message: String,
    },
    #[error("properties file {path}: {message}")]
    PropertiesFile { path: String, message: String },
}

/// Keys whose Synchrony name is not `synchrony.<flag with dots>`.
const RENAMED: &[(&str, &str)] = &[
    ("jwt-public-key", "jwt.public.key"),
    ("jwt-private-key", "jwt.private.key"),
    ("cluster-name", "cluster.name"),
    ("cluster-group-name", "cluster.group.name"),
    ("cluster-listen-port", "cluster.listen.port"),
    ("cluster-interfaces", "cluster.interfaces"),
    (
        "cluster-authentication-enabled",
        "cluster.authentication.enabled",
    ),
    (
        "cluster-authentication-secret",
        "cluster.authentication.secret",
    ),
    ("cluster-join-type", "cluster.join.type"),
    ("cluster-join-tcpip-members", "cluster.join.tcpip.members"),
    (
        "cluster-join-multicast-group",
        "cluster.join.multicast.group",
    ),
    ("cluster-join-multicast-port", "cluster.join.multicast.port"),
    ("cluster-join-multicast-ttl", "cluster.join.multicast.ttl"),
    ("cluster-join-redis-url", "cluster.join.redis.url"),
];

/// Keys Synchrony knows that this engine accepts without a flag (set by launchers, no meaning
/// here); they are not reported as unknown.
const ACCEPTED: &[&str] = &[
    "synchrony.extract.dir",
    "synchrony.working.dir",
    "synchrony.btf.disabled",
    "synchrony.properties.file",
    "synchrony.enable.xhr.fallback",
    "feature-auth-token",
    "auth-tokens",
    // Used by `synchrony token`, passed to every command by Confluence.
    "jwt.private.key",
];

/// Families of keys accepted the same way (discovery back-ends the cluster does not implement).
const ACCEPTED_PREFIXES: &[&str] = &[
    "cluster.join.aws.",
    "cluster.join.kubernetes.",
    "hazelcast.",
];

/// Prefixes of keys that are checked for typos.
const WATCHED_PREFIXES: &[&str] = &["synchrony.", "cluster.", "reza.", "jwt."];

/// The known keys of a subcommand, from its clap definition.
pub fn keys_of(command: &Command) -> Vec<Key> {
    command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            // Test hooks (hidden `--test-*` flags): no key form reaches them.
            let hook = arg.is_hide_set() && long.starts_with("test-");
            if hook || matches!(long, "help" | "version" | "properties-file") {
                return None;
            }
            let key = RENAMED
                .iter()
                .find(|(flag, _)| *flag == long)
                .map(|(_, key)| (*key).to_owned())
                .unwrap_or_else(|| format!("synchrony.{}", long.replace('-', ".")));
            let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
            Some(Key {
                key,
                long: long.to_owned(),
                env: arg.get_env().map(|e| e.to_string_lossy().into_owned()),
                secret: arg.is_hide_env_values_set(),
                switch,
            })
        })
        .collect()
}

fn upper_snake(key: &str) -> String {
    key.replace(['.', '-'], "_").to_ascii_uppercase()
}

/// Reads `key=value` / `key: value` lines; `#` and `!` start comments.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some(split) = line.find(['=', ':']) else {
            return Err(format!("line {}: expected key=value", n + 1));
        };
        let (key, value) = (line[..split].trim(), line[split + 1..].trim());
        if key.is_empty() {
            return Err(format!("line {}: empty key", n + 1));
        }
        out.push((key.to_owned(), value.to_owned()));
    }
    Ok(out)
}

/// Whether `arg` is a JVM-only argument; returns how many arguments it spans (`-cp x` is two).
fn jvm_arg(arg: &str) -> Option<usize> {
    if matches!(arg, "-classpath" | "-cp" | "--class-path") {
        return Some(2);
    }
    let one = [
        "-Xmx",
        "-Xms",
        "-Xss",
        "-XX:",
        "-Xlog",
        "-verbose",
        "-server",
        "-ea",
        "-da",
        "-javaagent:",
        "-agentlib:",
    ];
    one.iter().any(|p| arg.starts_with(p)).then_some(1)
}

/// The closest known key to `unknown`, when it is close enough to be a typo.
fn closest<'a>(unknown: &str, keys: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    keys.map(|k| (strsim::levenshtein(unknown, k), k))
        .filter(|(d, _)| *d <= 4)
        .min()
        .map(|(_, k)| k)
}

/// Resolves `argv` (program name first) for `command` against `env`.
///
/// `subcommand_pos` is where flags go: just after the subcommand name, or after the program
/// name when the subcommand is implied.
pub fn resolve(
    command: &Command,
    argv: &[String],
    env: &HashMap<String, String>,
    read_file: impl Fn(&str) -> Result<String, String>,
) -> Result<Resolved, KeyspaceError> {
    let keys = keys_of(command);
    let mut resolved = Resolved {
        keys: keys.clone(),
        ..Resolved::default()
    };

    // Pass 1: split out -D properties and JVM arguments; keep the rest for clap.
    let mut kept = Vec::new();
    let mut system: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let arg = &argv[i];
        // Everything after `--` belongs to someone else (the supervised engine).
        if arg == "--" {
            kept.extend(argv[i..].iter().cloned());
            break;
        }
        if i > 0 {
            if let Some(def) = arg.strip_prefix("-D") {
                let (k, v) = def.split_once('=').unwrap_or((def, "true"));
                system.push((k.to_owned(), v.to_owned()));
                i += 1;
                continue;
            }
            if let Some(span) = jvm_arg(arg) {
                let shown = argv[i..(i + span).min(argv.len())].join(" ");
                resolved
                    .warnings
                    .push(format!("ignoring JVM-only argument {shown:?}"));
                i += span;
                continue;
            }
            if arg == "synchrony.core"
                || (arg == "sql" && argv.get(i - 1).map(String::as_str) == Some("synchrony.core"))
            {
                resolved.warnings.push(format!(
                    "ignoring {arg:?} (the Synchrony launcher's main class and storage argument)"
                ));
                i += 1;
                continue;
            }
        }
        kept.push(arg.clone());
        i += 1;
    }

    // The properties file, if any.
    let file_path = find_flag(&kept, "properties-file")
        .or_else(|| {
            system
                .iter()
                .find(|(k, _)| k == "synchrony.properties.file")
                .map(|(_, v)| v.clone())
        })
        .or_else(|| env.get("synchrony.properties.file").cloned())
        .or_else(|| env.get("SYNCHRONY_PROPERTIES_FILE").cloned());
    let mut properties: Vec<(String, String)> = Vec::new();
    if let Some(path) = &file_path {
        let text = read_file(path).map_err(|message| KeyspaceError::PropertiesFile {
            path: path.clone(),
            message,
        })?;
        for (k, v) in parse_properties(&text).map_err(|message| KeyspaceError::PropertiesFile {
            path: path.clone(),
            message,
        })? {
            if k.starts_with("synchrony.jvm.arg.") {
                resolved
                    .warnings
                    .push(format!("ignoring JVM-only argument {v:?} ({k} in {path})"));
            } else {
                properties.push((k, v));
            }
        }
    }
    // Drop the properties-file flag itself: it is consumed here.
    let kept = strip_flag(kept, "properties-file");

    // Pass 2: a value for every key the command line does not set.
    let alias = |key: &str| {
        key.strip_prefix("synchrony.")
            .map(|rest| format!("reza.{rest}"))
    };
    let mut flags = Vec::new();
    for key in &keys {
        if find_flag(&kept, &key.long).is_some()
            || kept.iter().any(|a| a == &format!("--{}", key.long))
        {
            continue;
        }
        let mut names = vec![key.key.clone()];
        names.extend(alias(&key.key));
        let found = names
            .iter()
            .find_map(|n| {
                system
                    .iter()
                    .rev()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| (v.clone(), Source::SystemProperty(n.clone())))
            })
            .or_else(|| {
                // Environment: the dotted key, its UPPER_SNAKE forms, then the reza aliases.
                let reza = alias(&key.key);
                let candidates = [
                    Some(key.key.clone()),
                    key.env.clone(),
                    Some(upper_snake(&key.key)),
                    reza.clone(),
                    reza.as_deref().map(upper_snake),
                ];
                candidates.into_iter().flatten().find_map(|n| {
                    env.get(&n)
                        .filter(|v| !v.is_empty())
                        .map(|v| (v.clone(), Source::Environment(n)))
                })
            })
            .or_else(|| {
                let path = file_path.clone().unwrap_or_default();
                names.iter().find_map(|n| {
                    properties
                        .iter()
                        .rev()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| (v.clone(), Source::PropertiesFile(path.clone())))
                })
            });
        let Some((value, source)) = found else {
            continue;
        };
        if key.switch {
            match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => flags.push(format!("--{}", key.long)),
                "false" | "0" | "no" | "off" | "" => {}
                _ => {
                    return Err(KeyspaceError::BadValue {
                        key: key.key.clone(),
                        origin: source,
                        message: format!("{value:?} is not true or false"),
                    })
                }
            }
        } else {
            flags.push(format!("--{}={value}", key.long));
        }
        resolved.taken.push((key.clone(), value, source));
    }

    // Unknown keys in the places Synchrony's launchers put them.
    let known: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
    let mut unknown: Vec<(String, String)> = Vec::new();
    let watched = |k: &str| WATCHED_PREFIXES.iter().any(|p| k.starts_with(p));
    for (k, _) in &system {
        unknown.push((k.clone(), format!("-D{k}")));
    }
    for k in env.keys().filter(|k| k.contains('.')) {
        unknown.push((k.clone(), format!("environment {k}")));
    }
    for (k, _) in &properties {
        unknown.push((
            k.clone(),
            format!("properties file {}", file_path.clone().unwrap_or_default()),
        ));
    }
    for (k, place) in unknown {
        let canonical = k
            .strip_prefix("reza.")
            .map(|r| format!("synchrony.{r}"))
            .unwrap_or_else(|| k.clone());
        if !watched(&k)
            || known.contains(&canonical.as_str())
            || ACCEPTED.contains(&canonical.as_str())
            || ACCEPTED_PREFIXES.iter().any(|p| canonical.starts_with(p))
        {
            continue;
        }
        let hint = closest(&canonical, known.iter().copied())
            .map(|c| format!("; did you mean {c}?"))
            .unwrap_or_default();
        let line = format!("unknown configuration key {k} ({place}){hint}");
        resolved.unknown.push(line.clone());
        resolved.warnings.push(line);
    }

    // Flags go right after the subcommand (or the program name when it is implied).
    let mut args = kept;
    let at = subcommand_position(command, &args)
        .map_or(1, |p| p + 1)
        .min(args.len());
    for (n, flag) in flags.into_iter().enumerate() {
        args.insert(at + n, flag);
    }
    resolved.args = args;
    Ok(resolved)
}

/// Index of the subcommand's name in `args` (a flag's value never matches it by accident,
/// unlike "the first argument that is not a flag").
fn subcommand_position(command: &Command, args: &[String]) -> Option<usize> {
    args.iter()
        .skip(1)
        .position(|a| a == command.get_name())
        .map(|p| p + 1)
}

/// The value of `--long value` or `--long=value`.
fn find_flag(args: &[String], long: &str) -> Option<String> {
    let flag = format!("--{long}");
    let prefix = format!("--{long}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&prefix) {
            Some(v.to_owned())
        } else if *a == flag {
            args.get(i + 1).cloned()
        } else {
            None
        }
    })
}

fn strip_flag(args: Vec<String>, long: &str) -> Vec<String> {
    let flag = format!("--{long}");
    let prefix = format!("--{long}=");
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == flag {
            skip = true;
        } else if !a.starts_with(&prefix) {
            out.push(a);
        }
    }
    out
}

/// For a clap error about `--long`, the key and source that supplied the value, if any.
pub fn blame<'a>(resolved: &'a Resolved, error: &clap::Error) -> Option<&'a (Key, String, Source)> {
    let text = error.to_string();
    resolved.taken.iter().find(|(key, _, _)| {
        text.contains(&format!("--{} ", key.long))
            || text.contains(&format!("--{}=", key.long))
            || text.contains(&format!("--{} <", key.long))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn command() -> Command {
        Command::new("synchrony").subcommand(
            Command::new("serve")
                .arg(
                    Arg::new("port")
                        .long("port")
                        .env("SYNCHRONY_PORT")
                        .default_value("8091"),
                )
                .arg(Arg::new("bind").long("bind").env("SYNCHRONY_BIND"))
                .arg(
                    Arg::new("jwt-public-key")
                        .long("jwt-public-key")
                        .env("JWT_PUBLIC_KEY"),
                )
                .arg(
                    Arg::new("database-password")
                        .long("database-password")
                        .hide_env_values(true),
                )
                .arg(
                    Arg::new("cluster-authentication-enabled")
                        .long("cluster-authentication-enabled")
                        .action(ArgAction::SetTrue),
                ),
        )
    }

    fn serve() -> Command {
        command().find_subcommand("serve").unwrap().clone()
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| a.to_string()).collect()
    }

    fn port(r: &Resolved) -> Option<(String, Source)> {
        r.taken
            .iter()
            .find(|(k, _, _)| k.key == "synchrony.port")
            .map(|(_, v, s)| (v.clone(), s.clone()))
    }

    fn no_file(_: &str) -> Result<String, String> {
        Err("no such file".into())
    }

    #[test]
    fn precedence_over_every_form() {
        let file = |_: &str| Ok("synchrony.port=1005\n".to_owned());
        let all = env(&[
            ("synchrony.port", "1002"),
            ("SYNCHRONY_PORT", "1003"),
            ("reza.port", "1004"),
            ("SYNCHRONY_PROPERTIES_FILE", "/etc/s.properties"),
        ]);
        // Each row removes the winner of the row above.
        // (arguments, environment variables removed, expected value, expected source)
        type Case<'a> = (
            Vec<&'a str>,
            Vec<(&'a str, &'a str)>,
            Option<&'a str>,
            Option<Source>,
        );
        let cases: Vec<Case> = vec![
            (
                vec![
                    "synchrony",
                    "serve",
                    "--port",
                    "1000",
                    "-Dsynchrony.port=1001",
                ],
                vec![],
                None,
                None,
            ),
            (
                vec!["synchrony", "serve", "-Dsynchrony.port=1001"],
                vec![],
                Some("1001"),
                Some(Source::SystemProperty("synchrony.port".into())),
            ),
            (
                vec!["synchrony", "serve", "-Dreza.port=1001"],
                vec![],
                Some("1001"),
                Some(Source::SystemProperty("reza.port".into())),
            ),
            (
                vec!["synchrony", "serve"],
                vec![],
                Some("1002"),
                Some(Source::Environment("synchrony.port".into())),
            ),
            (
                vec!["synchrony", "serve"],
                vec![("synchrony.port", "")],
                Some("1003"),
                Some(Source::Environment("SYNCHRONY_PORT".into())),
            ),
        ];
        for (args, remove, want, source) in cases {
            let mut e = all.clone();
            for (k, _) in remove {
                e.remove(k);
            }
            let r = resolve(&serve(), &argv(&args), &e, file).unwrap();
            assert_eq!(
                port(&r).map(|(v, _)| v),
                want.map(str::to_owned),
                "{args:?}"
            );
            assert_eq!(port(&r).map(|(_, s)| s), source, "{args:?}");
            if want.is_none() {
                assert!(r.args.contains(&"1000".to_owned()));
            }
        }
        let mut e = all.clone();
        e.remove("synchrony.port");
        e.remove("SYNCHRONY_PORT");
        let r = resolve(&serve(), &argv(&["synchrony", "serve"]), &e, file).unwrap();
        assert_eq!(port(&r).unwrap().1, Source::Environment("reza.port".into()));
        e.remove("reza.port");
        let r = resolve(&serve(), &argv(&["synchrony", "serve"]), &e, file).unwrap();
        assert_eq!(
            port(&r).unwrap(),
            (
                "1005".into(),
                Source::PropertiesFile("/etc/s.properties".into())
            )
        );
        e.remove("SYNCHRONY_PROPERTIES_FILE");
        let r = resolve(&serve(), &argv(&["synchrony", "serve"]), &e, file).unwrap();
        assert_eq!(port(&r), None, "default");
    }

    #[test]
    fn flags_land_after_the_subcommand_even_behind_a_global_flag_value() {
        let e = env(&[("synchrony.port", "7")]);
        let args = argv(&["synchrony", "--log-format", "json", "serve"]);
        let r = resolve(&serve(), &args, &e, no_file).unwrap();
        assert_eq!(
            r.args,
            vec!["synchrony", "--log-format", "json", "serve", "--port=7"]
        );
    }

    #[test]
    fn jvm_arguments_and_the_launcher_tail_are_dropped_with_warnings() {
        let args = argv(&[
            "synchrony",
            "-Xss2048k",
            "-Xmx2g",
            "-XX:+UseG1GC",
            "-classpath",
            "a.jar:b.jar",
            "synchrony.core",
            "sql",
        ]);
        let r = resolve(&serve(), &args, &HashMap::new(), no_file).unwrap();
        assert_eq!(r.args, vec!["synchrony"]);
        assert_eq!(r.warnings.len(), 6, "{:?}", r.warnings);
        assert!(r
            .warnings
            .iter()
            .any(|w| w.contains("-classpath a.jar:b.jar")));
    }

    #[test]
    fn flags_are_inserted_after_the_subcommand_and_switches_are_parsed() {
        let e = env(&[
            ("cluster.authentication.enabled", "true"),
            ("jwt.public.key", "KEY"),
        ]);
        let r = resolve(
            &serve(),
            &argv(&["synchrony", "serve", "--bind", "::1"]),
            &e,
            no_file,
        )
        .unwrap();
        assert_eq!(r.args[1], "serve");
        assert!(r
            .args
            .contains(&"--cluster-authentication-enabled".to_owned()));
        assert!(r.args.contains(&"--jwt-public-key=KEY".to_owned()));
        let bad = env(&[("cluster.authentication.enabled", "maybe")]);
        let err = resolve(&serve(), &argv(&["synchrony", "serve"]), &bad, no_file).unwrap_err();
        assert!(
            err.to_string().contains(
                "cluster.authentication.enabled (from environment cluster.authentication.enabled)"
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_get_the_closest_known_one() {
        let e = env(&[
            ("synchrony.prot", "1"),
            ("cluster.whatever.thing", "x"),
            ("other.key", "y"),
            ("synchrony.working.dir", "/x"),
            ("jwt.private.key", "PEM"),
            ("cluster.join.aws.region", "eu-west-1"),
        ]);
        let r = resolve(
            &serve(),
            &argv(&["synchrony", "serve", "-Dsynchrony.bnd=1"]),
            &e,
            no_file,
        )
        .unwrap();
        let w = r.warnings.join("\n");
        assert!(w.contains("unknown configuration key synchrony.prot (environment synchrony.prot); did you mean synchrony.port?"), "{w}");
        assert!(
            w.contains("synchrony.bnd (-Dsynchrony.bnd); did you mean synchrony.bind?"),
            "{w}"
        );
        assert!(w.contains("cluster.whatever.thing"));
        for quiet in ["other.key", "working.dir", "jwt.private.key", "aws.region"] {
            assert!(
                !w.contains(quiet),
                "{quiet} should be accepted silently: {w}"
            );
        }
    }

    #[test]
    fn properties_files() {
        let props =
            parse_properties("# comment\n! also\nsynchrony.port = 9\ncluster.join.type: tcpip\n\n")
                .unwrap();
        assert_eq!(
            props,
            vec![
                ("synchrony.port".into(), "9".into()),
                ("cluster.join.type".into(), "tcpip".into())
            ]
        );
        assert!(parse_properties("novalue").is_err());
        let err = resolve(
            &serve(),
            &argv(&["synchrony", "serve", "--properties-file", "/nope"]),
            &HashMap::new(),
            no_file,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nope"), "{err}");
        let file = |_: &str| Ok("synchrony.jvm.arg.0=-XX:+PrintGC\nsynchrony.port=7\n".to_owned());
        let r = resolve(
            &serve(),
            &argv(&["synchrony", "serve", "--properties-file=/f"]),
            &HashMap::new(),
            file,
        )
        .unwrap();
        assert!(!r.args.iter().any(|a| a.contains("properties-file")));
        assert!(r.args.contains(&"--port=7".to_owned()));
        assert!(r.warnings.iter().any(|w| w.contains("-XX:+PrintGC")));
    }

    #[test]
    fn secrets_are_known_as_secrets() {
        let keys = keys_of(&serve());
        let pw = keys
            .iter()
            .find(|k| k.key == "synchrony.database.password")
            .unwrap();
        assert!(pw.secret);
        assert!(keys.iter().any(|k| k.key == "jwt.public.key" && !k.secret));
    }
}
