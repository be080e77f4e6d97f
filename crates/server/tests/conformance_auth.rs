//! The conformance suite again, through a server that requires keys (as admin).

use std::sync::Arc;

use cairn_client::HttpStore;
use cairn_core::EventStore;

fn admin_store() -> (Arc<dyn EventStore>, crate::auth::Secured) {
    let s = crate::auth::secured();
    let client: Arc<dyn EventStore> =
        Arc::new(HttpStore::new(&s.url).unwrap().with_api_key(&s.admin));
    (client, s)
}

cairn_core::conformance_suite!(admin_store());
