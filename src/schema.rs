// @generated automatically by Diesel CLI.

diesel::table! {
    agents (id) {
        id -> Text,
        concurrency -> Integer,
        first_seen_ms -> BigInt,
        last_seen_ms -> BigInt,
    }
}

diesel::table! {
    commands (id) {
        id -> Integer,
        command_type -> Text,
        payload -> Text,
        idempotent -> Bool,
        target_agent_id -> Nullable<Text>,
        assigned_agent_id -> Nullable<Text>,
        status -> Text,
        attempts -> Integer,
        result -> Nullable<Text>,
        status_reason -> Nullable<Text>,
        created_at_ms -> BigInt,
        updated_at_ms -> BigInt,
    }
}

diesel::table! {
    submissions (idempotency_key) {
        idempotency_key -> Text,
        request -> Text,
        created_commands -> Text,
        created_at_ms -> BigInt,
    }
}

diesel::allow_tables_to_appear_in_same_query!(agents, commands, submissions,);
