//! The reconnect advice exists once, in `CloseCode::retry`; the copies that cannot call it (the
//! JavaScript client, the protocol document) must say the same for every code.

use std::collections::BTreeMap;
use std::path::Path;

use hub_protocol::CloseCode;

fn the_table() -> BTreeMap<u16, String> {
    CloseCode::ALL
        .iter()
        .map(|c| (c.as_u16(), c.retry().as_str().to_owned()))
        .collect()
}

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn fleet_client_js_follows_the_close_code_table() {
    let js = read("../hub/assets/fleet-client.js");
    let start = js
        .find("export const CLOSE_RETRY = Object.freeze({")
        .expect("fleet-client.js exports CLOSE_RETRY");
    let body = &js[start..];
    let body = &body[..body.find("});").expect("CLOSE_RETRY ends")];
    let copy: BTreeMap<u16, String> = body
        .lines()
        .filter_map(|line| {
            let (code, advice) = line.trim().trim_end_matches(',').split_once(": ")?;
            Some((code.parse().ok()?, advice.trim_matches('\'').to_owned()))
        })
        .collect();
    assert_eq!(copy, the_table());
}

#[test]
fn the_protocol_document_follows_the_close_code_table() {
    let doc = read("../../docs/protocol.md");
    let section = &doc[doc.find("## Close codes").expect("a close codes section")..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let copy: BTreeMap<u16, String> = section
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | code | reason | cause | retry | also |
            let code = cells.get(1)?.parse().ok()?;
            let reason = cells.get(2)?.trim_matches('`');
            let close = CloseCode::from_u16(code).unwrap_or_else(|| {
                panic!("docs/protocol.md lists {code}, which the hub never sends")
            });
            assert_eq!(reason, close.reason(), "the reason of {code}");
            Some((code, cells.get(4)?.to_string()))
        })
        .collect();
    assert_eq!(copy, the_table());
}
