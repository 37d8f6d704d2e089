//! Any outcome a plugin could return: validation refuses it or passes it,
//! never panics; what it passes builds into valid messages.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use sendbox_fuzz::FuzzEmail;
use sendbox_types::{Bytes, HttpResponse, Outcome};

#[derive(Debug, Arbitrary)]
struct FuzzOutcome {
    emails: Vec<FuzzEmail>,
    response: Option<(u16, Vec<(String, String)>, Vec<u8>)>,
}

fuzz_target!(|o: FuzzOutcome| {
    let outcome = Outcome {
        emails: o.emails.into_iter().map(Into::into).collect(),
        response: o.response.map(|(status, headers, body)| HttpResponse {
            status,
            headers,
            body: Bytes(body),
        }),
    };
    let limits = sendbox_runtime::Limits::default();
    if sendbox_runtime::validate::outcome(&outcome, &limits).is_ok() {
        outcome.emails.iter().for_each(sendbox_fuzz::build_and_check);
    }
});
