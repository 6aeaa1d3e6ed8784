//! The field reference (`docs/reference.md`), generated from the CRDs'
//! OpenAPI schemas so it can never disagree with what the API server
//! enforces. `agent-token-operator reference` prints it.

use std::fmt::Write;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::crd::{AgentToken, ClusterTokenIssuer, TokenIssuer};

/// The whole reference as Markdown.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Field reference\n\n\
         Generated from the CRDs by `agent-token-operator reference` (`make crds`); \
         do not edit by hand. Validation listed here is enforced at admission.\n",
    );
    for crd in [
        AgentToken::crd(),
        TokenIssuer::crd(),
        ClusterTokenIssuer::crd(),
    ] {
        let crd = serde_json::to_value(&crd).expect("a CRD serializes");
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or("?");
        let version = &crd["spec"]["versions"][0];
        let schema = &version["schema"]["openAPIV3Schema"];
        let _ = write!(
            out,
            "\n## {kind}\n\n`{}/{}`, {}.\n",
            crd["spec"]["group"].as_str().unwrap_or(""),
            version["name"].as_str().unwrap_or(""),
            if crd["spec"]["scope"] == "Namespaced" {
                "namespaced"
            } else {
                "cluster-scoped"
            },
        );
        if let Some(d) = schema["description"].as_str() {
            let _ = writeln!(out, "\n{}", one_line(d));
        }
        for rule in rules(schema) {
            let _ = writeln!(out, "\n- Rule: {rule}");
        }
        out.push_str("\n| Field | Type | Description |\n|---|---|---|\n");
        for part in ["spec", "status"] {
            if let Some(s) = schema["properties"].get(part) {
                walk(
                    &mut out,
                    part,
                    s,
                    required(schema).contains(&part.to_string()),
                );
            }
        }
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn required(schema: &Value) -> Vec<String> {
    schema["required"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn rules(schema: &Value) -> Vec<String> {
    schema["x-kubernetes-validations"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|r| r["message"].as_str().map(one_line))
                .collect()
        })
        .unwrap_or_default()
}

fn type_of(s: &Value) -> String {
    if s.get("x-kubernetes-int-or-string").is_some() {
        return "int or string".into();
    }
    if s.get("x-kubernetes-preserve-unknown-fields").is_some() && s.get("type").is_none() {
        return "object".into();
    }
    match s["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&s["items"])),
        Some("object") if s.get("additionalProperties").is_some() => {
            format!("map[string]{}", type_of(&s["additionalProperties"]))
        }
        Some(t) => {
            let mut t = t.to_string();
            if let Some(f) = s["format"].as_str() {
                t = format!("{t} ({f})");
            }
            t
        }
        None => "any".into(),
    }
}

fn walk(out: &mut String, path: &str, s: &Value, is_required: bool) {
    let mut desc = s["description"].as_str().map(one_line).unwrap_or_default();
    let mut notes = Vec::new();
    if is_required {
        notes.push("required".to_string());
    }
    if let Some(values) = s["enum"].as_array() {
        let v: Vec<String> = values
            .iter()
            .map(|v| format!("`{}`", v.as_str().unwrap_or("")))
            .collect();
        notes.push(format!("one of {}", v.join(", ")));
    }
    if let Some(p) = s["pattern"].as_str() {
        notes.push(format!("pattern `{}`", p.replace('|', "\\|")));
    }
    for (key, word) in [
        ("minimum", "min"),
        ("maximum", "max"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("maxItems", "max items"),
    ] {
        if let Some(v) = s.get(key) {
            notes.push(format!("{word} {v}"));
        }
    }
    if let Some(d) = s.get("default") {
        notes.push(format!("default `{d}`"));
    }
    notes.extend(rules(s).into_iter().map(|r| format!("rule: {r}")));
    if !notes.is_empty() {
        desc = format!("{desc} ({})", notes.join("; "));
    }
    let _ = writeln!(out, "| `{path}` | {} | {} |", type_of(s), desc.trim());
    let req = required(s);
    let children = if s["type"] == "array" {
        &s["items"]["properties"]
    } else {
        &s["properties"]
    };
    if let Some(props) = children.as_object() {
        let prefix = if s["type"] == "array" {
            format!("{path}[]")
        } else {
            path.to_string()
        };
        let child_req = if s["type"] == "array" {
            required(&s["items"])
        } else {
            req
        };
        for (name, child) in props {
            walk(
                out,
                &format!("{prefix}.{name}"),
                child,
                child_req.contains(name),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn docs_reference_matches_the_crds() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md");
        let on_disk = std::fs::read_to_string(path).expect("docs/reference.md exists (make crds)");
        assert!(
            on_disk == super::markdown(),
            "docs/reference.md is stale: run `make crds` and commit"
        );
    }

    #[test]
    fn every_spec_field_is_documented() {
        let md = super::markdown();
        for line in md.lines().filter(|l| l.starts_with("| `spec")) {
            let desc = line.rsplit('|').nth(1).unwrap_or("").trim();
            assert!(!desc.is_empty(), "undocumented field: {line}");
        }
    }
}
