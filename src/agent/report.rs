//! `tvctl-agent --report`: one line on the console saying what the agent can see.
//!
//! Guest tests and people reading a console log use it to check, from inside the guest, that
//! tracefs is mounted and which virtio-serial ports exist under which names. The line starts
//! with `TVCTL-REPORT ` followed by a flat JSON object, so it can be grepped out of a boot log.

use super::ports::PortMap;
use super::tracefs::Tracefs;

/// Builds the report line.
pub fn report_line() -> String {
    let tracefs = Tracefs::find();
    let ports = PortMap::system();
    let names: Vec<String> = ports.names().map(json_string).collect();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(
        "TVCTL-REPORT {{\"agent_version\":{},\"kernel\":{},\"tracefs\":{},\"cpus\":{},\"ports\":[{}]}}",
        json_string(env!("CARGO_PKG_VERSION")),
        json_string(&kernel),
        match &tracefs {
            Some(t) => json_string(&t.root().to_string_lossy()),
            None => "null".to_string(),
        },
        online_cpus(),
        names.join(",")
    )
}

/// Number of CPUs the guest has online.
pub fn online_cpus() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
}

/// A JSON string literal (the agent carries no JSON library).
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_escapes() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }

    #[test]
    fn report_line_is_prefixed_json() {
        let line = report_line();
        assert!(line.starts_with("TVCTL-REPORT {"));
        assert!(line.ends_with('}'));
    }
}
