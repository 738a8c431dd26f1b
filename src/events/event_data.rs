//! What an event carries: JSON kept as the compact text that frames, relays and stores use,
//! and parsed into a [`Value`] only for the handlers that ask for one.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

/// An event's data: compact JSON text, and its [`Value`], parsed on first use.
#[derive(Debug)]
pub struct EventData {
    json: Box<str>,
    user_id: Option<Box<str>>,
    value: OnceLock<Arc<Value>>,
}

impl EventData {
    /// Takes JSON a parser accepted (a publish body, a relay's entry) without building a
    /// `Value`, which would be most of a publish's cost: one pass refuses what a `Value` parse
    /// would refuse (numbers beyond `f64`, lone surrogates), so [`EventData::value`] cannot
    /// fail, and finds the `user_id`. Whitespace outside strings is dropped, so the frame is
    /// one `data:` line.
    pub fn from_raw(raw: &RawValue) -> Result<Self, serde_json::Error> {
        let checked: Checked = serde_json::from_str(raw.get())?;
        Ok(EventData {
            json: compact(raw.get()),
            user_id: checked.user_id.map(Into::into),
            value: OnceLock::new(),
        })
    }

    /// The compact JSON text, as every frame carries it.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// The string `user_id` of an object: whose streams the event goes to.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    /// The data as a `Value`, parsed once, on the first call.
    pub fn value(&self) -> &Arc<Value> {
        self.value.get_or_init(|| {
            let value = serde_json::from_str(&self.json);
            Arc::new(value.expect("from_raw refused whatever a Value would"))
        })
    }
}

impl From<Value> for EventData {
    fn from(value: Value) -> Self {
        EventData {
            json: value.to_string().into(),
            user_id: value.get("user_id").and_then(Value::as_str).map(Into::into),
            value: OnceLock::from(Arc::new(value)),
        }
    }
}

/// `json` without whitespace outside strings (form feed, the one other ASCII whitespace,
/// cannot be in valid JSON at all).
fn compact(json: &str) -> Box<str> {
    if !json.bytes().any(|byte| byte.is_ascii_whitespace()) {
        return json.into();
    }
    let mut out = Vec::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json.as_bytes() {
        if in_string {
            let was_escaped = escaped;
            escaped = !was_escaped && byte == b'\\';
            in_string = was_escaped || byte != b'"';
        } else if byte.is_ascii_whitespace() {
            continue;
        } else {
            in_string = byte == b'"';
        }
        out.push(byte);
    }
    let compact = String::from_utf8(out).expect("only ASCII whitespace was left out");
    compact.into_boxed_str()
}

/// The first key that makes a `Value` parse (with serde_json's `raw_value` feature, which
/// `EventData` needs) read the object's one string value as the JSON it stands for.
const RAW_VALUE_TOKEN: &str = "$serde_json::private::RawValue";

/// A JSON value read the way a `Value` is (so it fails where a `Value` would) but kept only
/// as far as a string's text, and an object's string `user_id`.
#[derive(Default)]
struct Checked<'de> {
    string: Option<Cow<'de, str>>,
    user_id: Option<Cow<'de, str>>,
}

impl<'de> Deserialize<'de> for Checked<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Checked<'de>, E> {
        Ok(Checked::default())
    }

    fn visit_i64<E>(self, _: i64) -> Result<Checked<'de>, E> {
        Ok(Checked::default())
    }

    fn visit_u64<E>(self, _: u64) -> Result<Checked<'de>, E> {
        Ok(Checked::default())
    }

    fn visit_f64<E>(self, _: f64) -> Result<Checked<'de>, E> {
        Ok(Checked::default())
    }

    fn visit_unit<E>(self) -> Result<Checked<'de>, E> {
        Ok(Checked::default())
    }

    fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Checked<'de>, E> {
        let string = Some(Cow::Borrowed(text));
        Ok(Checked {
            string,
            ..Checked::default()
        })
    }

    fn visit_str<E>(self, text: &str) -> Result<Checked<'de>, E> {
        let string = Some(Cow::Owned(text.to_owned()));
        Ok(Checked {
            string,
            ..Checked::default()
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked<'de>, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked<'de>, A::Error> {
        let mut user_id = None;
        let mut first = true;
        while let Some(key) = map.next_key::<Checked>()? {
            if std::mem::take(&mut first) && key.string.as_deref() == Some(RAW_VALUE_TOKEN) {
                // As a `Value` parse reads it: the string is the JSON the object stands for.
                let inner = map.next_value::<Cow<str>>()?;
                let checked = serde_json::from_str::<Checked>(&inner).map_err(A::Error::custom)?;
                let owned = |text: Cow<str>| Cow::Owned(text.into_owned());
                return Ok(Checked {
                    string: checked.string.map(owned),
                    user_id: checked.user_id.map(owned),
                });
            }
            let value = map.next_value::<Checked>()?;
            // The last one wins, as in a `Value`.
            if key.string.as_deref() == Some("user_id") {
                user_id = value.string;
            }
        }
        Ok(Checked {
            user_id,
            ..Checked::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn from_text(text: &str) -> Result<EventData, serde_json::Error> {
        EventData::from_raw(serde_json::from_str(text)?)
    }

    #[test]
    fn whitespace_goes_only_outside_strings_and_the_order_stays() {
        let data = from_text("{ \"b\" : [ 1 ,\t2 ],\r\n \"a\\\" b\" : \" x \\\\\" }").unwrap();
        assert_eq!(data.json(), r#"{"b":[1,2],"a\" b":" x \\"}"#);
        assert_eq!(**data.value(), json!({"b": [1, 2], "a\" b": " x \\"}));
    }

    #[test]
    fn the_user_id_is_a_string_at_the_top_of_an_object() {
        let user_of = |text: &str| from_text(text).unwrap().user_id().map(str::to_owned);
        assert_eq!(
            user_of(r#"{"n": 1, "user_id": "ada"}"#).as_deref(),
            Some("ada")
        );
        assert_eq!(
            user_of(r#"{"user_id": "a\u00efda"}"#).as_deref(),
            Some("aïda")
        );
        assert_eq!(user_of(r#"["ada"]"#), None);
        assert_eq!(user_of(r#"{"user_id": 7}"#), None);
        assert_eq!(
            user_of(r#"{"user_id": "a", "user_id": "b"}"#).as_deref(),
            Some("b")
        );
        assert_eq!(user_of(r#"{"job": {"user_id": "ada"}}"#), None);
        assert_eq!(user_of(r#""ada""#), None);
        let built = EventData::from(json!({"user_id": "ada"}));
        assert_eq!(built.user_id(), Some("ada"));
    }

    #[test]
    fn what_a_value_would_refuse_is_refused() {
        let refused = [
            r#"{"n": 1e400}"#,
            r#"[-1234567890123456789012345e300]"#,
            r#"{"a": {"b": [1, 2e999]}}"#,
            r#"["\ud800"]"#,
        ];
        for text in refused {
            assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");
            assert!(from_text(text).is_err(), "{text}");
        }
        for text in [
            r#"{"t": true, "n": -2.5e3, "s": "\u00e9\\u", "z": null}"#,
            "[]",
        ] {
            let data = from_text(text).unwrap();
            assert_eq!(**data.value(), serde_json::from_str::<Value>(text).unwrap());
        }
    }
}
