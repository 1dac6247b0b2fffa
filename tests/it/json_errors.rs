//! `json:` names qemu's JSON reader refuses are refused with qemu-img's words (`Could not
//! parse the JSON options: …`), and those it takes are not refused as malformed: a table
//! of cases (with the words qemu-img 10.0 prints) and generated names, each asked of
//! qemu-img itself.

use diskimg::json_options;
use diskimg_blockio::Error;
use diskimg_testutil::qemu_img;

const PARSE: &str = "Could not parse the JSON options: ";

/// qemu-img's complaint about `json:TEXT` when its JSON reader refuses it.
fn qemu_says(text: &str) -> Option<String> {
    let name = format!("json:{text}");
    let o = qemu_img(&["info", "-U", &name]);
    assert!(!o.status.success(), "{text:?} opened");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let rest = err
        .strip_prefix(&format!("qemu-img: Could not open '{name}': "))
        .unwrap_or_else(|| panic!("{text:?}: {err}"));
    rest.strip_prefix(PARSE)
        .map(|m| m.trim_end_matches('\n').to_string())
}

/// Our complaint about `json:TEXT` as malformed JSON.
fn we_say(text: &str) -> Option<String> {
    match json_options(&format!("json:{text}")) {
        Err(Error::InvalidArgument(m)) => m.strip_prefix(PARSE).map(str::to_string),
        _ => None,
    }
}

#[test]
fn malformed_json_names_in_qemus_words() {
    let p = |m: &str| Some(format!("JSON parse error, {m}"));
    let deep = "[".repeat(1025);
    let cases: &[(&str, Option<String>)] = &[
        ("{", p("premature EOI")),
        (r#"{"a""#, p("premature EOI")),
        (r#"{"a":}"#, p("expecting value")),
        (r#"{"a":1,}"#, p("expecting value")),
        (
            r#"{"a":1}x"#,
            Some("Expecting at most one JSON value".into()),
        ),
        ("{broken", p("invalid keyword 'broken'")),
        (r#"{"a":tru}"#, p("invalid keyword 'tru'")),
        (r#"{"a":1 "b":2}"#, p("expected separator in dict")),
        ("[1 2]", p("expected separator in list")),
        (r#"{"a" 1}"#, p("missing : in object pair")),
        ("{1:2}", p("key is not a string in object")),
        (r#"{"a":@}"#, p("stray '@'")),
        ("", Some("Expecting a JSON value".into())),
        (" \t\n", Some("Expecting a JSON value".into())),
        (r#"{"a":"\q"}"#, p("invalid escape sequence in string")),
        (r#"{"a":01}"#, p("stray '01'")),
        (r#"{"a":1.}"#, p("stray '1.}'")),
        (r#"{"a":-"#, p("stray '-'")),
        (r#"{"a":-0e1}"#, p("expected separator in dict")),
        ("{\"a\":\"x\u{1}\"}", p("stray '\"x\u{1}'")),
        (
            r#"{"a":"\u00"}"#,
            p(r#"\u00" is not a valid Unicode character"#),
        ),
        (
            r#"{"a":"\uD800\u0041"}"#,
            p(r"\uD800 is not a valid Unicode character"),
        ),
        (
            r#"{"a":"\uD83F\uDFFE"}"#,
            p(r"\uD83F\uDFFE is not a valid Unicode character"),
        ),
        (
            r#"{"a":"\uFFFF"}"#,
            p(r"\uFFFF is not a valid Unicode character"),
        ),
        (
            "{\"a\":\"\u{FDD0}\"}",
            p("invalid UTF-8 sequence in string"),
        ),
        (r#"{"a":1,"a":2}"#, p("duplicate key")),
        (r#"{"\u0061":1,'a':}"#, p("expecting value")),
        (r#"{"\u0061":1,'a':2}"#, p("duplicate key")),
        (r#"[{"b":{"c":1,"c":2},"b":3}"#, p("duplicate key")),
        (&deep, Some("JSON nesting depth limit exceeded".into())),
        // Taken by qemu's reader (other complaints follow).
        (r#"[1,true,null,-2.5e3,"\uD83D\uDE00"]"#, None),
        (r#"{'a':{"b":'\'"'},"c":[]}"#, None),
    ];
    for (text, want) in cases {
        assert_eq!(&qemu_says(text), want, "qemu-img on {text:?}");
        assert_eq!(&we_say(text), want, "{text:?}");
    }
}

/// Short names of JSON-ish pieces from a fixed pseudo-random sequence, compared with
/// qemu-img one by one.
#[test]
fn generated_names_like_qemu() {
    const PIECES: &[&str] = &[
        "{",
        "{",
        "}",
        "}",
        "[",
        "]",
        ":",
        ",",
        ",",
        "\"a\"",
        "'b'",
        "\"a\":1,",
        "'a':[],",
        "\"\\u0061\":",
        "1",
        "-1.5e3",
        "0",
        "01",
        "e",
        "true",
        "null",
        "nul",
        " ",
        "@",
        "\"",
        "\"\\q\"",
        "\"\\u00e9\"",
        "\"\\uD800\"",
        "\"\\uDBFF\\uDFFF\"",
        "\"\\u12\"",
        "é",
        "\n",
        "\u{1}",
        "\"\u{FDD0}\"",
        "\"é\"",
        "-0e1",
        "1e",
        "-",
    ];
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) as usize % n
    };
    let mut differ = Vec::new();
    for _ in 0..300 {
        let mut text = String::from(if next(2) == 0 { "{" } else { "" });
        for _ in 0..1 + next(8) {
            text.push_str(PIECES[next(PIECES.len())]);
        }
        let (q, d) = (qemu_says(&text), we_say(&text));
        if q != d {
            differ.push(format!("{text:?}: qemu {q:?}, diskimg {d:?}"));
        }
    }
    assert!(differ.is_empty(), "{}", differ.join("\n"));
}
