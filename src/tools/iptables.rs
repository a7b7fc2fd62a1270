//! `agentmesh init-iptables`: the rules that send a pod's outbound TCP to
//! the sidecar's transparent port, as Linkerd's and Istio's init
//! containers install them. In the `nat` table, a chain of our own,
//! `AGENTMESH_OUTPUT`, reached from `OUTPUT` for TCP:
//!
//! 1. the sidecar's own connections (its user id) go out untouched, or
//!    they would come back to it;
//! 2. so do connections to loopback (the proxy and admin ports, and
//!    anything else the pod talks to on itself);
//! 3. and to the excluded ports;
//! 4. everything else is redirected to the transparent port.
//!
//! Applied with `iptables-restore --noflush` (one atomic change per
//! table), for IPv4 and, where `ip6tables-restore` exists, IPv6. Running it
//! again replaces the chain's rules; the jump from `OUTPUT` is added once.

use std::io::Write as _;
use std::process::{Command, Stdio};

pub const CHAIN: &str = "AGENTMESH_OUTPUT";

/// What to redirect, and what not.
#[derive(Clone, Debug)]
pub struct Rules {
    /// The transparent listener's port.
    pub port: u16,
    /// The user id the sidecar runs as.
    pub proxy_uid: u32,
    /// Destination ports never redirected.
    pub exclude_ports: Vec<u16>,
}

impl Rules {
    /// The `iptables-restore` input for one family (`loopback`:
    /// `127.0.0.0/8` or `::1/128`), with the jump from `OUTPUT` or not.
    pub fn restore_input(&self, loopback: &str, jump: bool) -> String {
        let mut out = format!("*nat\n:{CHAIN} - [0:0]\n");
        if jump {
            out.push_str(&format!("-A OUTPUT -p tcp -j {CHAIN}\n"));
        }
        out.push_str(&format!(
            "-A {CHAIN} -m owner --uid-owner {} -j RETURN\n",
            self.proxy_uid
        ));
        out.push_str(&format!("-A {CHAIN} -d {loopback} -j RETURN\n"));
        for port in &self.exclude_ports {
            out.push_str(&format!("-A {CHAIN} -p tcp --dport {port} -j RETURN\n"));
        }
        out.push_str(&format!(
            "-A {CHAIN} -p tcp -j REDIRECT --to-ports {}\nCOMMIT\n",
            self.port
        ));
        out
    }

    /// Installs the rules (or with `dry_run`, prints what it would feed
    /// `iptables-restore`). IPv6 is skipped, with a note, where
    /// `ip6tables-restore` is missing or the kernel has no IPv6 NAT.
    pub fn apply(&self, dry_run: bool) -> Result<(), String> {
        for (family, tool, loopback) in [
            ("ipv4", "iptables", "127.0.0.0/8"),
            ("ipv6", "ip6tables", "::1/128"),
        ] {
            let jump = dry_run || !has_jump(tool);
            let input = self.restore_input(loopback, jump);
            if dry_run {
                println!("# {family}: {tool}-restore --noflush <<EOF\n{input}EOF");
                continue;
            }
            match restore(&format!("{tool}-restore"), &input) {
                Ok(()) => eprintln!(
                    "{family}: outbound TCP redirected to port {} (uid {} excepted)",
                    self.port, self.proxy_uid
                ),
                Err(e) if family == "ipv6" => {
                    eprintln!("ipv6: not redirected ({e})");
                }
                Err(e) => return Err(format!("{family}: {e}")),
            }
        }
        Ok(())
    }
}

/// Whether `OUTPUT` jumps to our chain already.
fn has_jump(tool: &str) -> bool {
    Command::new(tool)
        .args(["-t", "nat", "-C", "OUTPUT", "-p", "tcp", "-j", CHAIN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn restore(tool: &str, input: &str) -> Result<(), String> {
    let mut child = Command::new(tool)
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{tool}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_loopback_and_excluded_ports_go_out_untouched_and_the_rest_is_redirected() {
        let rules = Rules {
            port: 15006,
            proxy_uid: 2102,
            exclude_ports: vec![22, 15000],
        };
        assert_eq!(
            rules.restore_input("127.0.0.0/8", true),
            "*nat\n:AGENTMESH_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j AGENTMESH_OUTPUT\n\
             -A AGENTMESH_OUTPUT -m owner --uid-owner 2102 -j RETURN\n\
             -A AGENTMESH_OUTPUT -d 127.0.0.0/8 -j RETURN\n\
             -A AGENTMESH_OUTPUT -p tcp --dport 22 -j RETURN\n\
             -A AGENTMESH_OUTPUT -p tcp --dport 15000 -j RETURN\n\
             -A AGENTMESH_OUTPUT -p tcp -j REDIRECT --to-ports 15006\nCOMMIT\n"
        );
        assert!(!rules.restore_input("::1/128", false).contains("-A OUTPUT"));
    }
}
