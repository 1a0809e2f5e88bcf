//! The DERP map as coderd serves it in JSON, and what a DERP-only client
//! does with it.
//!
//! `GET /api/v2/workspaceagents/{id}/connection` returns Tailscale's
//! `tailcfg.DERPMap` with Go field names. The embedded relay's region is
//! rewritten to the deployment URL the client already uses (as Coder's SDK
//! does), and the client homes on the embedded relay when there is one,
//! else on the lowest-numbered usable region.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `AgentConnectionInfo`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct ConnectionInfo {
    pub derp_map: DerpMap,
    pub derp_force_websockets: bool,
    pub disable_direct_connections: bool,
    pub hostname_suffix: String,
}

/// `tailcfg.DERPMap`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct DerpMap {
    #[serde(rename = "Regions", deserialize_with = "null_default")]
    pub regions: BTreeMap<i64, Region>,
    #[serde(
        rename = "OmitDefaultRegions",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub omit_default_regions: bool,
}

/// `tailcfg.DERPRegion`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Region {
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    #[serde(rename = "EmbeddedRelay")]
    pub embedded_relay: bool,
    #[serde(rename = "RegionCode")]
    pub region_code: String,
    #[serde(rename = "RegionName")]
    pub region_name: String,
    #[serde(rename = "Avoid")]
    pub avoid: bool,
    #[serde(rename = "Nodes", deserialize_with = "null_default")]
    pub nodes: Vec<Node>,
}

/// `tailcfg.DERPNode`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default)]
pub struct Node {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    #[serde(rename = "HostName")]
    pub host_name: String,
    #[serde(rename = "CertName", skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    #[serde(rename = "IPv4", skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(rename = "IPv6", skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    #[serde(rename = "STUNPort")]
    pub stun_port: i64,
    #[serde(rename = "STUNOnly")]
    pub stun_only: bool,
    #[serde(rename = "DERPPort")]
    pub derp_port: i64,
    #[serde(rename = "InsecureForTests")]
    pub insecure_for_tests: bool,
    #[serde(rename = "ForceHTTP")]
    pub force_http: bool,
}

fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Where to reach one DERP node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerpTarget {
    pub region_id: i64,
    /// `https` or `http`.
    pub scheme: &'static str,
    /// Host for TLS verification and the `Host` header.
    pub host: String,
    /// Address to dial (an IP when the map pins one, else the host).
    pub dial_host: String,
    pub port: u16,
}

impl DerpTarget {
    /// `scheme://host[:port]/derp`.
    pub fn url(&self) -> String {
        let default = if self.scheme == "https" { 443 } else { 80 };
        if self.port == default {
            format!("{}://{}/derp", self.scheme, self.host)
        } else {
            format!("{}://{}:{}/derp", self.scheme, self.host, self.port)
        }
    }
}

impl From<&crate::proto::DerpMap> for DerpMap {
    /// The map `StreamDERPMaps` sends, in the JSON model's shape.
    fn from(p: &crate::proto::DerpMap) -> DerpMap {
        let regions = p
            .regions
            .iter()
            .map(|(id, r)| {
                let nodes = r
                    .nodes
                    .iter()
                    .map(|n| Node {
                        name: n.name.clone(),
                        region_id: n.region_id,
                        host_name: n.host_name.clone(),
                        cert_name: n.cert_name.clone(),
                        ipv4: n.ipv4.clone(),
                        ipv6: n.ipv6.clone(),
                        stun_port: i64::from(n.stun_port),
                        stun_only: n.stun_only,
                        derp_port: i64::from(n.derp_port),
                        insecure_for_tests: n.insecure_for_tests,
                        force_http: n.force_http,
                    })
                    .collect();
                let region = Region {
                    region_id: r.region_id,
                    embedded_relay: r.embedded_relay,
                    region_code: r.region_code.clone(),
                    region_name: r.region_name.clone(),
                    avoid: r.avoid,
                    nodes,
                };
                (*id, region)
            })
            .collect();
        DerpMap {
            regions,
            omit_default_regions: false,
        }
    }
}

impl DerpMap {
    /// Point the embedded relay's nodes at the deployment URL we use.
    pub fn rewrite_embedded_relay(&mut self, scheme: &str, host: &str, port: u16) {
        for r in self.regions.values_mut().filter(|r| r.embedded_relay) {
            for n in r.nodes.iter_mut().filter(|n| !n.stun_only) {
                n.host_name = host.to_string();
                n.derp_port = i64::from(port);
                n.force_http = scheme == "http";
                n.ipv4.clear();
                n.ipv6.clear();
            }
        }
    }

    /// The home region for a DERP-only client.
    pub fn home_region(&self) -> Option<i64> {
        let usable = |r: &&Region| r.nodes.iter().any(|n| !n.stun_only);
        self.regions
            .values()
            .filter(usable)
            .find(|r| r.embedded_relay)
            .or_else(|| self.regions.values().filter(usable).find(|r| !r.avoid))
            .or_else(|| self.regions.values().find(usable))
            .map(|r| r.region_id)
    }

    /// The first DERP-capable node of a region.
    pub fn target(&self, region: i64) -> Option<DerpTarget> {
        let r = self.regions.get(&region)?;
        let n = r.nodes.iter().find(|n| !n.stun_only)?;
        let scheme = if n.force_http { "http" } else { "https" };
        let port = match n.derp_port {
            p if p > 0 && p <= 65535 => p as u16,
            _ if n.force_http => 80,
            _ => 443,
        };
        let dial_host = if !n.ipv4.is_empty() && n.ipv4 != "none" {
            n.ipv4.clone()
        } else {
            n.host_name.clone()
        };
        Some(DerpTarget {
            region_id: region,
            scheme,
            host: if n.cert_name.is_empty() {
                n.host_name.clone()
            } else {
                n.cert_name.clone()
            },
            dial_host,
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{
      "derp_map": {"HomeParams": {"RegionScore": null}, "Regions": {
        "999": {"EmbeddedRelay": true, "RegionID": 999, "RegionCode": "coder", "RegionName": "Coder Embedded Relay",
                "Nodes": [{"Name": "999b", "RegionID": 999, "HostName": "internal", "IPv4": "10.0.0.1",
                           "STUNPort": -1, "DERPPort": 443, "ForceHTTP": false, "CanPort80": true}]},
        "1": {"RegionID": 1, "RegionCode": "stun", "Nodes": [{"Name": "s", "RegionID": 1, "HostName": "stun.l.google.com",
                "STUNPort": 19302, "STUNOnly": true}]},
        "10001": {"RegionID": 10001, "RegionCode": "proxy", "Nodes": [{"Name": "p", "RegionID": 10001,
                "HostName": "proxy.example.com", "DERPPort": 0}]}
      }},
      "derp_force_websockets": false, "disable_direct_connections": true, "hostname_suffix": "coder", "extra": 1
    }"#;

    #[test]
    fn decode_rewrite_and_choose() {
        let mut info: ConnectionInfo = serde_json::from_str(JSON).unwrap();
        assert_eq!(info.derp_map.regions.len(), 3);
        assert!(info.disable_direct_connections);
        assert_eq!(info.derp_map.home_region(), Some(999));
        info.derp_map
            .rewrite_embedded_relay("http", "127.0.0.1", 3000);
        let t = info.derp_map.target(999).unwrap();
        assert_eq!(t.url(), "http://127.0.0.1:3000/derp");
        assert_eq!(t.dial_host, "127.0.0.1");
        let p = info.derp_map.target(10001).unwrap();
        assert_eq!(p.url(), "https://proxy.example.com/derp");
        assert!(
            info.derp_map.target(1).is_none(),
            "STUN-only regions carry no DERP"
        );
    }

    #[test]
    fn no_embedded_relay_picks_lowest_usable() {
        let mut info: ConnectionInfo = serde_json::from_str(JSON).unwrap();
        info.derp_map.regions.remove(&999);
        assert_eq!(info.derp_map.home_region(), Some(10001));
        let empty: ConnectionInfo =
            serde_json::from_str(r#"{"derp_map": {"Regions": null}}"#).unwrap();
        assert_eq!(empty.derp_map.home_region(), None);
    }
}
