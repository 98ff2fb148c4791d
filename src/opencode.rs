//! Wire types of the OpenCode runtime (sessions, statuses, messages, parts, events in every
//! envelope era, the `/global/event` wrapper). Unknown fields and event types are kept or
//! ignored, never an error. (Filled in by the oracle work, issue 3.)
