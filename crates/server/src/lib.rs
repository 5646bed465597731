//! keelson server
