//! `spec.template` as the operator holds it: the pod template's JSON, not k8s-openapi's structs.
//!
//! Every ChatRelease sits in the controller's cache for as long as it exists, but its pod template
//! is read only when a track's Deployment is written or checked. k8s-openapi's `PodTemplateSpec`
//! holds every field of a pod and of each container inline: 1.8 kB for the template and 2.1 kB
//! for each container, however little the user wrote. The JSON of a typical template is a tenth
//! of that, so it is kept as JSON and parsed when a decision needs the pod.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// A pod template, kept as the JSON serde_json writes for its `PodTemplateSpec`: fields in
/// declaration order, maps sorted, so equal templates have equal bytes (and equal revisions).
#[derive(Clone, PartialEq, Eq)]
pub struct PodTemplate {
    json: Box<str>,
}

impl PodTemplate {
    /// The template as k8s-openapi's struct, to build or compare a Deployment's pod spec.
    pub fn spec(&self) -> PodTemplateSpec {
        // The bytes were written from a PodTemplateSpec by `From` below, so they read back; a
        // default template (no containers) is what `Settings` refuses if they ever did not.
        serde_json::from_str(&self.json).unwrap_or_default()
    }

    /// The short hash of the template that names a revision: the label on a track's Deployment
    /// and pods, and what tells a new template from the running one.
    pub fn revision(&self) -> String {
        let digest = Sha256::digest(self.json.as_bytes());
        digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
    }
}

impl From<PodTemplateSpec> for PodTemplate {
    fn from(spec: PodTemplateSpec) -> Self {
        // Serialising a k8s-openapi struct to JSON has no failure case (no non-string map keys,
        // no NaN: quantities are strings); an empty object would read back as the default.
        let json = serde_json::to_string(&spec).unwrap_or_else(|_| "{}".to_string());
        Self { json: json.into() }
    }
}

impl std::fmt::Debug for PodTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("PodTemplate").field(&self.json).finish()
    }
}

impl Serialize for PodTemplate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Through the struct, so that YAML and every other format see an object, not a string.
        self.spec().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PodTemplate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        PodTemplateSpec::deserialize(deserializer).map(Self::from)
    }
}

/// The schema is `PodTemplateSpec`'s: what users write and the API server checks is unchanged.
impl JsonSchema for PodTemplate {
    fn inline_schema() -> bool {
        PodTemplateSpec::inline_schema()
    }

    fn schema_name() -> Cow<'static, str> {
        PodTemplateSpec::schema_name()
    }

    fn schema_id() -> Cow<'static, str> {
        PodTemplateSpec::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        PodTemplateSpec::json_schema(generator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template(image: &str) -> serde_json::Value {
        json!({
            "metadata": {"labels": {"b": "2", "a": "1"}},
            "spec": {"containers": [{"name": "chat", "image": image,
                "resources": {"limits": {"memory": "1Gi"}}}]}
        })
    }

    #[test]
    fn reads_back_what_it_was_given() {
        let spec: PodTemplateSpec = serde_json::from_value(template("chat:v1")).unwrap();
        let kept: PodTemplate = serde_json::from_value(template("chat:v1")).unwrap();
        assert_eq!(kept.spec(), spec);
        assert_eq!(serde_json::to_value(&kept).unwrap(), template("chat:v1"));
    }

    #[test]
    fn revision_is_the_hash_of_the_struct_json() {
        let spec: PodTemplateSpec = serde_json::from_value(template("chat:v1")).unwrap();
        // The revision running clusters carry on their Deployments: an operator upgrade must not
        // see a new template where there is none.
        let before_upgrade: String = Sha256::digest(serde_json::to_vec(&spec).unwrap())
            .iter()
            .take(5)
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(PodTemplate::from(spec).revision(), before_upgrade);
        let v1: PodTemplate = serde_json::from_value(template("chat:v1")).unwrap();
        let v2: PodTemplate = serde_json::from_value(template("chat:v2")).unwrap();
        assert_ne!(v1.revision(), v2.revision());
    }

    #[test]
    fn key_order_in_the_input_does_not_change_the_revision() {
        let a: PodTemplate = serde_json::from_str(
            r#"{"spec":{"containers":[{"image":"x","name":"c"}]},"metadata":{"labels":{"a":"1","b":"2"}}}"#,
        )
        .unwrap();
        let b: PodTemplate = serde_json::from_str(
            r#"{"metadata":{"labels":{"b":"2","a":"1"}},"spec":{"containers":[{"name":"c","image":"x"}]}}"#,
        )
        .unwrap();
        assert_eq!(a.revision(), b.revision());
    }

    #[test]
    fn holds_far_less_than_the_struct() {
        let kept: PodTemplate = serde_json::from_value(template("chat:v1")).unwrap();
        let inline = std::mem::size_of::<PodTemplateSpec>()
            + std::mem::size_of::<k8s_openapi::api::core::v1::Container>();
        assert!(
            std::mem::size_of::<PodTemplate>() + kept.json.len() < inline / 10,
            "{} bytes of JSON against {inline} bytes of structs",
            kept.json.len()
        );
    }

    #[test]
    fn yaml_sees_an_object() {
        let kept: PodTemplate = serde_json::from_value(template("chat:v1")).unwrap();
        let yaml = serde_yaml::to_string(&kept).unwrap();
        assert!(yaml.contains("image: chat:v1"), "{yaml}");
    }
}
