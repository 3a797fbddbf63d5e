//! STUB (replaced by the guardparts branch).
#![allow(missing_docs, dead_code, unused_variables)]
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
}
pub fn default_rules() -> Vec<AclRule> {
    vec![]
}
pub fn validate(rules: &[AclRule], problems: &mut Vec<(String, String)>) {}
#[derive(Debug, Clone)]
pub struct Rights;
impl Rights {
    pub fn for_user(rules: &[AclRule], user: &str) -> Rights {
        Rights
    }
    pub fn everything() -> Rights {
        Rights
    }
    pub fn may_publish(&self, topic: &str) -> bool {
        true
    }
    pub fn may_subscribe(&self, filter: &str) -> bool {
        true
    }
}
