use crate::common::fresh_dyn;

cairn_core::conformance_suite!(fresh_dyn());
