//! kine's command line on kubeshard's: Go's duration and boolean syntax,
//! and kine's `KINE_*` environment variables.
//!
//! kine (urfave/cli over Go's `flag`) reads each flag from the command
//! line, else from its `KINE_*` variable. kubeshard reads its own
//! `KUBESHARD_*` variables through clap; a `KINE_*` variable fills a flag
//! that neither the command line nor a `KUBESHARD_*` variable set.

use std::ffi::OsString;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// The flags kine reads from a `KINE_*` variable (kine v0.17's names; the
/// t4 driver's `--s3-*` flags read `AWS_*` variables, which are not taken
/// here: they belong to every AWS tool in the environment).
const KINE_VARIABLES: &[&str] = &[
    "listen-address",
    "endpoint",
    "ca-file",
    "cert-file",
    "key-file",
    "skip-verify",
    "log-format",
    "metrics-bind-address",
    "server-cert-file",
    "server-key-file",
    "trusted-ca-file",
    "datastore-max-idle-connections",
    "datastore-max-open-connections",
    "datastore-connection-max-lifetime",
    "datastore-connection-max-idle-time",
    "slow-sql-threshold",
    "slow-sql-warning-threshold",
    "metrics-enable-profiling",
    "metrics-ignore-tls-config",
    "watch-progress-notify-interval",
    "emulated-etcd-version",
    "compact-interval",
    "compact-interval-jitter",
    "compact-timeout",
    "compact-min-retain",
    "compact-batch-size",
    "poll-batch-size",
    "datastore-poll-interval",
    "peer-bind-address",
    "peer-advertise-address",
    "debug",
];

/// kine's flag and the kubeshard flag that sets the same thing: a `KINE_*`
/// variable does not fill the first when the second was given.
const SAME_SETTING: &[(&str, &str)] = &[
    ("datastore-poll-interval", "watch_poll_interval_ms"),
    (
        "watch-progress-notify-interval",
        "progress_notify_interval_secs",
    ),
    ("endpoint", "config"),
];

/// `--listen-address` becomes `KINE_LISTEN_ADDRESS`.
pub fn variable(flag: &str) -> String {
    format!("KINE_{}", flag.to_uppercase().replace('-', "_"))
}

/// Parses the command line, filling flags left at their default from
/// `KINE_*` variables (read through `env`, so tests need not change the
/// process environment).
pub fn parse_with_kine_env<I, T>(
    args: I,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = Cli::command().try_get_matches_from(&args)?;
    let mut from_kine = Vec::new();
    for flag in KINE_VARIABLES {
        let id = flag.replace('-', "_");
        let partner_given = SAME_SETTING
            .iter()
            .any(|(kine, ours)| kine == flag && !left_at_default(&matches, ours));
        if !left_at_default(&matches, &id) || partner_given {
            continue;
        }
        if let Some(value) = env(&variable(flag)) {
            from_kine.push(OsString::from(format!("--{flag}={value}")));
        }
    }
    if from_kine.is_empty() {
        return Cli::from_arg_matches(&matches);
    }
    let mut with_kine = args;
    let at = usize::from(!with_kine.is_empty());
    with_kine.splice(at..at, from_kine);
    let matches = Cli::command().try_get_matches_from(with_kine)?;
    Cli::from_arg_matches(&matches)
}

fn left_at_default(matches: &ArgMatches, id: &str) -> bool {
    match matches.try_contains_id(id) {
        Ok(true) => matches!(matches.value_source(id), Some(ValueSource::DefaultValue)),
        Ok(false) => true,
        // Not a flag of kubeshard's: a mistake in the table above.
        Err(_) => false,
    }
}

/// Go's `time.ParseDuration`: `300ms`, `1.5h`, `2m0s`, `-1s`, `0`. kine
/// treats zero and negative durations as "off"; they come back as zero.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?} (Go's form: 300ms, 1.5h, 2m0s)");
    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..number_end].parse().map_err(|_| invalid())?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(invalid()),
        };
        nanos += number * scale;
        rest = &rest[unit_end..];
    }
    if negative || nanos <= 0.0 {
        return Ok(Duration::ZERO);
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

/// Go's `strconv.ParseBool`, which urfave/cli uses for boolean flags.
pub fn parse_go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!(
            "invalid boolean {text:?} (one of 1, t, true, TRUE, True, 0, f, false, FALSE, False)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = |t: &str| parse_go_duration(t).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("300ms"), Duration::from_millis(300));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("2m0s"), Duration::from_secs(120));
        assert_eq!(ok("1h2m3.5s"), Duration::from_millis(3_723_500));
        assert_eq!(ok("10us"), Duration::from_micros(10));
        assert_eq!(ok("-1s"), Duration::ZERO);
        for bad in ["", "5", "1x", "s", "1.2.3s", "-", "1 s"] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn go_booleans() {
        assert_eq!(parse_go_bool("True"), Ok(true));
        assert_eq!(parse_go_bool("0"), Ok(false));
        assert!(parse_go_bool("yes").is_err());
    }

    #[test]
    fn every_kine_variable_names_a_flag() {
        let command = Cli::command();
        for flag in KINE_VARIABLES {
            assert!(
                command.get_arguments().any(|a| a.get_long() == Some(*flag)),
                "--{flag} is not a flag of kubeshard"
            );
        }
    }
}
