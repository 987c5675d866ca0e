//! Control-plane credentials of a test deployment: a random password per role, rendered into
//! the NATS authorization block and the Redis ACL file from the templates in `deploy/auth/`,
//! the same files `deploy/local/cluster.sh` renders, so the tests exercise exactly the
//! permission sets a deployment gets.
//!
//! Roles: `gateway`, `worker`, `loadtest` (the load tool's broker floor) and `admin`. Admin is
//! the harness's own user (raw reads of the log, checks on Redis keys, cleanup); it is never
//! given to a gateway or a worker.

use std::collections::HashMap;

/// The NATS authorization template (placeholders `@NS@`, `@<ROLE>_PASSWORD@`).
pub const NATS_TEMPLATE: &str = include_str!("../../deploy/auth/nats-auth.conf.in");
/// The Redis ACL file template (same placeholders).
pub const REDIS_TEMPLATE: &str = include_str!("../../deploy/auth/redis-users.acl.in");

/// Who connects to the brokers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Full permissions: the harness and operators only.
    Admin,
    /// Gateways.
    Gateway,
    /// Workers.
    Worker,
    /// The load tool (NATS only).
    Loadtest,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [Role::Admin, Role::Gateway, Role::Worker, Role::Loadtest];

    /// The user name on NATS and Redis.
    pub fn user(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Gateway => "gateway",
            Role::Worker => "worker",
            Role::Loadtest => "loadtest",
        }
    }

    fn placeholder(self) -> String {
        format!("@{}_PASSWORD@", self.user().to_ascii_uppercase())
    }
}

/// One deployment's users: its namespace and a random password per role.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    namespace: String,
    passwords: HashMap<Role, String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ namespace: {:?}, .. }}", self.namespace)
    }
}

impl Credentials {
    /// Fresh random passwords (128 random bits each) for the users of namespace `ns`.
    pub fn generate(ns: &str) -> Self {
        let passwords = Role::ALL
            .into_iter()
            .map(|r| (r, uuid::Uuid::new_v4().simple().to_string()))
            .collect();
        Credentials {
            namespace: ns.to_owned(),
            passwords,
        }
    }

    /// The namespace the permissions are for.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The password of a role.
    pub fn password(&self, role: Role) -> &str {
        self.passwords.get(&role).map_or("", String::as_str)
    }

    fn render(&self, template: &str) -> String {
        let mut out = template.replace("@NS@", &self.namespace);
        for role in Role::ALL {
            out = out.replace(&role.placeholder(), self.password(role));
        }
        out
    }

    /// The NATS configuration (`authorization { users = [...] }`) for `nats-server -c`.
    pub fn nats_config(&self) -> String {
        self.render(NATS_TEMPLATE)
    }

    /// The Redis ACL file (`redis-server --aclfile`).
    pub fn redis_acl(&self) -> String {
        self.render(REDIS_TEMPLATE)
    }

    /// `user:password@` of a role, to put after a URL's `scheme://`.
    pub fn userinfo(&self, role: Role) -> String {
        format!("{}:{}@", role.user(), self.password(role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_every_placeholder() {
        let c = Credentials::generate("t1");
        for text in [c.nats_config(), c.redis_acl()] {
            assert!(!text.contains("_PASSWORD@"), "{text}");
            assert!(!text.contains("@NS@"));
            assert!(text.contains(c.password(Role::Gateway)));
        }
        assert!(c.redis_acl().contains("~t1:status:*"));
        assert!(!format!("{c:?}").contains(c.password(Role::Admin)));
    }
}
