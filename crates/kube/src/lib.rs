//! keelson kube
