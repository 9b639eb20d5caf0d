//! The OpenAI-compatible caching gateway (issue 17), built up in parts. So
//! far: the request side ([`request`]): which requests may be answered from
//! the exact layer, the key of those that may, and whose cache they read.
//! The server, streaming, the semantic layer and coalescing come next.

pub mod request;
