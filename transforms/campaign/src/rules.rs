//! The campaign rules themselves, free of any WIT glue: validation of a raw payload, the
//! "active now" decision and the shaping of notification drafts. Kept plain Rust so the same
//! code runs as the WASM component (through `lib.rs`) and natively (for the overhead benchmark).

use serde_json::{Map, Value};

/// A campaign that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaign {
    pub restaurant_id: String,
    pub adv_campaign_id: String,
    pub adv_campaign_content: String,
    pub adv_campaign_owner: String,
    pub adv_campaign_owner_contact: String,
    pub adv_campaign_datetime_start: i64,
    pub adv_campaign_datetime_end: i64,
    pub datetime_created: i64,
}

/// Machine-readable reason for refusing a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    NotUtf8,
    MalformedJson,
    NotAnObject,
    MissingField,
    WrongType,
    InvalidUuid,
    InvalidInterval,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: Code,
    pub field: Option<String>,
    pub detail: String,
}

impl Rejection {
    fn new(code: Code, field: Option<&str>, detail: String) -> Self {
        Rejection {
            code,
            field: field.map(str::to_owned),
            detail,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Active,
    NotStarted,
    Expired,
}

/// The "active now" rule: a campaign produces drafts only while start < now < end.
pub fn activity(c: &Campaign, now: i64) -> Activity {
    if now <= c.adv_campaign_datetime_start {
        Activity::NotStarted
    } else if now >= c.adv_campaign_datetime_end {
        Activity::Expired
    } else {
        Activity::Active
    }
}

/// Validates one raw payload: UTF-8, a JSON object, every field present with its type, ids
/// that are hyphenated UUIDs, start strictly before end. Unknown extra fields are ignored.
pub fn validate(payload: &[u8]) -> Result<Campaign, Rejection> {
    let text = std::str::from_utf8(payload).map_err(|e| {
        Rejection::new(
            Code::NotUtf8,
            None,
            format!("payload is not valid UTF-8: {e}"),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            Code::MalformedJson,
            None,
            format!("payload is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(Rejection::new(
            Code::NotAnObject,
            None,
            format!("payload is JSON but not an object (it is {})", kind(&value)),
        ));
    };
    let campaign = Campaign {
        restaurant_id: uuid_field(&obj, "restaurant_id")?,
        adv_campaign_id: uuid_field(&obj, "adv_campaign_id")?,
        adv_campaign_content: string_field(&obj, "adv_campaign_content")?,
        adv_campaign_owner: string_field(&obj, "adv_campaign_owner")?,
        adv_campaign_owner_contact: string_field(&obj, "adv_campaign_owner_contact")?,
        adv_campaign_datetime_start: seconds_field(&obj, "adv_campaign_datetime_start")?,
        adv_campaign_datetime_end: seconds_field(&obj, "adv_campaign_datetime_end")?,
        datetime_created: seconds_field(&obj, "datetime_created")?,
    };
    if campaign.adv_campaign_datetime_start >= campaign.adv_campaign_datetime_end {
        return Err(Rejection::new(
            Code::InvalidInterval,
            Some("adv_campaign_datetime_start"),
            format!(
                "campaign must start before it ends: start {} >= end {}",
                campaign.adv_campaign_datetime_start, campaign.adv_campaign_datetime_end
            ),
        ));
    }
    Ok(campaign)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn present<'a>(obj: &'a Map<String, Value>, name: &str) -> Result<&'a Value, Rejection> {
    match obj.get(name) {
        None | Some(Value::Null) => Err(Rejection::new(
            Code::MissingField,
            Some(name),
            format!("required field `{name}` is missing"),
        )),
        Some(v) => Ok(v),
    }
}

fn string_field(obj: &Map<String, Value>, name: &str) -> Result<String, Rejection> {
    match present(obj, name)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(Rejection::new(
            Code::WrongType,
            Some(name),
            format!("field `{name}` must be a string, found {}", kind(other)),
        )),
    }
}

fn uuid_field(obj: &Map<String, Value>, name: &str) -> Result<String, Rejection> {
    let s = string_field(obj, name)?;
    // The hyphenated form only (8-4-4-4-12): ids are join keys and must match the table's text.
    if s.len() == 36 && uuid::Uuid::try_parse(&s).is_ok() {
        Ok(s)
    } else {
        Err(Rejection::new(
            Code::InvalidUuid,
            Some(name),
            format!("field `{name}` must be a hyphenated UUID, found {s:?}"),
        ))
    }
}

fn seconds_field(obj: &Map<String, Value>, name: &str) -> Result<i64, Rejection> {
    let v = present(obj, name)?;
    v.as_i64().ok_or_else(|| {
        Rejection::new(
            Code::WrongType,
            Some(name),
            format!("field `{name}` must be an integer of unix seconds, found {v}"),
        )
    })
}

/// Shapes the output JSON of SPEC.md, exactly its fields in its order, once per client. The
/// part before and after `client_id` is the same for every client, so it is rendered once.
pub fn shape<'a, I>(c: &Campaign, clients: I, now: i64) -> Vec<(String, Vec<u8>)>
where
    I: IntoIterator<Item = &'a str>,
    I::IntoIter: ExactSizeIterator,
{
    let mut head = Vec::with_capacity(256 + c.adv_campaign_content.len());
    head.extend_from_slice(b"{\"restaurant_id\":");
    push_json_str(&mut head, &c.restaurant_id);
    head.extend_from_slice(b",\"adv_campaign_id\":");
    push_json_str(&mut head, &c.adv_campaign_id);
    head.extend_from_slice(b",\"adv_campaign_content\":");
    push_json_str(&mut head, &c.adv_campaign_content);
    head.extend_from_slice(b",\"adv_campaign_owner\":");
    push_json_str(&mut head, &c.adv_campaign_owner);
    head.extend_from_slice(b",\"adv_campaign_owner_contact\":");
    push_json_str(&mut head, &c.adv_campaign_owner_contact);
    head.extend_from_slice(
        format!(
            ",\"adv_campaign_datetime_start\":{},\"adv_campaign_datetime_end\":{},\"client_id\":",
            c.adv_campaign_datetime_start, c.adv_campaign_datetime_end
        )
        .as_bytes(),
    );
    let tail = format!(
        ",\"datetime_created\":{},\"trigger_datetime_created\":{}}}",
        c.datetime_created, now
    );

    let clients = clients.into_iter();
    let mut out = Vec::with_capacity(clients.len());
    for client in clients {
        let mut payload = Vec::with_capacity(head.len() + client.len() + 2 + tail.len());
        payload.extend_from_slice(&head);
        push_json_str(&mut payload, client);
        payload.extend_from_slice(tail.as_bytes());
        out.push((client.to_owned(), payload));
    }
    out
}

fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly as JSON requires; writing into a Vec cannot fail.
    serde_json::to_writer(&mut *buf, s).expect("writing JSON to a Vec never fails");
}

#[cfg(test)]
mod tests {
    //! Native checks of the pure logic; the faithful tests run the built component under
    //! wasmtime (transforms/campaign/tests/component.rs).
    use super::*;

    #[test]
    fn shaped_json_round_trips_with_escapes() {
        let c = Campaign {
            restaurant_id: "r".into(),
            adv_campaign_id: "a".into(),
            adv_campaign_content: "quote \" and \\ and \n newline".into(),
            adv_campaign_owner: "o".into(),
            adv_campaign_owner_contact: "e".into(),
            adv_campaign_datetime_start: 1,
            adv_campaign_datetime_end: 3,
            datetime_created: 0,
        };
        let out = shape(&c, ["x\"y"], 2);
        let v: Value = serde_json::from_slice(&out[0].1).unwrap();
        assert_eq!(v["adv_campaign_content"], "quote \" and \\ and \n newline");
        assert_eq!(v["client_id"], "x\"y");
        assert_eq!(v["trigger_datetime_created"], 2);
    }
}
