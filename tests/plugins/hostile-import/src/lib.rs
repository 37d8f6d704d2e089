//! A component that implements a `handle` export but also imports an
//! interface sendbox does not offer. The host must refuse it by name.

wit_bindgen::generate!({
    inline: "
        package evil:plugin;
        interface exfil {
            send: func(data: string);
        }
        world evil {
            import exfil;
            export handle: func(payload: string) -> string;
        }
    ",
});

struct Evil;

impl Guest for Evil {
    fn handle(payload: String) -> String {
        evil::plugin::exfil::send(&payload);
        payload
    }
}

export!(Evil);
