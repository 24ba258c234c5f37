//! An Odoo-compatible external API for tests and the demo: JSON-RPC at `/jsonrpc` with the `common`
//! service (`login`) and the `object` service (`execute_kw`: `search`, `search_read`, `read`, `create`,
//! `write`) over in-memory `res.partner` and `crm.lead` records. Domains are lists of `[field, "=", value]`
//! (and `"!="`), all of which must hold. Errors come back as Odoo sends them: HTTP 200 with an `error`
//! object.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// What the fixture accepts.
pub const DB: &str = "acraflow";
pub const USERNAME: &str = "sync@acme.sg";
pub const API_KEY: &str = "odoo-fixture-key-2c9f";
pub const UID: i64 = 2;

#[derive(Default)]
pub struct OdooDb {
    next_id: i64,
    /// model -> id -> record (its fields, `id` included).
    records: BTreeMap<String, BTreeMap<i64, Map<String, Value>>>,
    /// Every `execute_kw` call, as `model.method`.
    pub calls: Vec<String>,
}

impl OdooDb {
    pub fn records(&self, model: &str) -> Vec<Value> {
        self.records.get(model).map(|r| r.values().map(|m| Value::Object(m.clone())).collect()).unwrap_or_default()
    }
}

fn error(id: &Value, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": 200, "message": "Odoo Server Error",
        "data": {"name": "odoo.exceptions.UserError", "message": message}}})
}

fn matches(record: &Map<String, Value>, domain: &Value) -> bool {
    domain.as_array().into_iter().flatten().all(|cond| {
        let c = cond.as_array();
        let (Some(field), Some(op), Some(value)) =
            (c.and_then(|c| c.first()?.as_str()), c.and_then(|c| c.get(1)?.as_str()), c.and_then(|c| c.get(2)))
        else {
            return true; // "&", "|": the fixture reads domains as all-of
        };
        let have = record.get(field).unwrap_or(&Value::Bool(false));
        match op {
            "=" => have == value,
            "!=" => have != value,
            _ => false,
        }
    })
}

/// The record ids an `execute_kw` call's first positional argument lists.
fn ids(positional: &[Value]) -> Vec<i64> {
    positional.first().and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_i64).collect()
}

/// Answers one JSON-RPC request body.
pub fn handle(db: &mut OdooDb, body: &[u8]) -> Value {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "Parse error"}});
    };
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    let params = req.get("params").cloned().unwrap_or_default();
    let args = params.get("args").and_then(Value::as_array).cloned().unwrap_or_default();
    let ok = |result: Value| json!({"jsonrpc": "2.0", "id": id, "result": result});
    match (params.get("service").and_then(Value::as_str), params.get("method").and_then(Value::as_str)) {
        (Some("common"), Some("login" | "authenticate")) => {
            let good = args.first() == Some(&json!(DB))
                && args.get(1) == Some(&json!(USERNAME))
                && args.get(2) == Some(&json!(API_KEY));
            ok(if good { json!(UID) } else { json!(false) })
        }
        (Some("object"), Some("execute_kw")) => {
            if args.first() != Some(&json!(DB))
                || args.get(1) != Some(&json!(UID))
                || args.get(2) != Some(&json!(API_KEY))
            {
                return error(&id, "Access Denied");
            }
            let (Some(model), Some(method)) =
                (args.get(3).and_then(Value::as_str), args.get(4).and_then(Value::as_str))
            else {
                return error(&id, "execute_kw: model and method expected");
            };
            let positional = args.get(5).and_then(Value::as_array).cloned().unwrap_or_default();
            let kwargs = args.get(6).cloned().unwrap_or_default();
            db.calls.push(format!("{model}.{method}"));
            if !["res.partner", "crm.lead"].contains(&model) {
                return error(&id, &format!("Object {model} doesn't exist"));
            }
            let table = db.records.entry(model.to_owned()).or_default();
            match method {
                "search" | "search_read" | "search_count" => {
                    let domain = positional.first().cloned().unwrap_or(json!([]));
                    let limit = kwargs.get("limit").and_then(Value::as_u64).unwrap_or(u64::MAX) as usize;
                    let found: Vec<&Map<String, Value>> =
                        table.values().filter(|r| matches(r, &domain)).take(limit).collect();
                    match method {
                        "search" => ok(json!(found.iter().map(|r| r["id"].clone()).collect::<Vec<_>>())),
                        "search_count" => ok(json!(found.len())),
                        _ => ok(json!(found)),
                    }
                }
                "read" => {
                    let ids = ids(&positional);
                    ok(json!(ids.iter().filter_map(|i| table.get(i)).collect::<Vec<_>>()))
                }
                "create" => {
                    let one = |vals: &Value, db_next: &mut i64, table: &mut BTreeMap<i64, Map<String, Value>>| {
                        *db_next += 1;
                        let mut rec = vals.as_object().cloned().unwrap_or_default();
                        rec.insert("id".into(), json!(*db_next));
                        table.insert(*db_next, rec);
                        *db_next
                    };
                    match positional.first() {
                        Some(Value::Array(list)) => {
                            let ids: Vec<i64> = list.iter().map(|v| one(v, &mut db.next_id, table)).collect();
                            ok(json!(ids))
                        }
                        Some(vals @ Value::Object(_)) => ok(json!(one(vals, &mut db.next_id, table))),
                        _ => error(&id, "create: values expected"),
                    }
                }
                "write" => {
                    let ids = ids(&positional);
                    let vals = positional.get(1).and_then(Value::as_object).cloned().unwrap_or_default();
                    for i in &ids {
                        match table.get_mut(i) {
                            Some(rec) => rec.extend(vals.clone()),
                            None => {
                                return error(
                                    &id,
                                    &format!("Record does not exist or has been deleted. ({model}({i},))"),
                                )
                            }
                        }
                    }
                    ok(json!(true))
                }
                _ => error(&id, &format!("The method '{method}' does not exist on the model '{model}'")),
            }
        }
        _ => error(&id, "unknown service or method"),
    }
}
