//! The server-side Lua scripts: each one is atomic on Redis (no other command runs in
//! between), so an exchange's turns, pending reply and usage land together or not at
//! all. A user record is written compare-and-set: the script applies the new record
//! only if the stored bytes are still those the caller read (else it returns 0 and the
//! caller reads again), which works on a multiplexed connection where WATCH does not.

use std::sync::LazyLock;

/// Lua shared by the scripts that write a user record:
/// `put_user_if(had, seen, new, id, ident_key, ident)` sets `KEYS[1]` to `new` and adds
/// `id` to the set `KEYS[2]` if the record still holds `seen` (`had` is `1` if a record
/// was read, so an absent one must still be absent); else it returns 0. With a data key
/// `ident` is the user's sealed identity, written to `ident_key` (`P:ident:{U}`) with
/// the record, so no user exists in Redis whose id a backup cannot name; without one
/// it is empty and nothing more is written.
macro_rules! put_user_if_lua {
    () => {
        r#"
local function put_user_if(had, seen, new, id, ident_key, ident)
  local cur = redis.call('GET', KEYS[1])
  if had == '1' then
    if cur ~= seen then return 0 end
  elseif cur then
    return 0
  end
  redis.call('SET', KEYS[1], new)
  redis.call('SADD', KEYS[2], id)
  if ident ~= '' then redis.call('SET', ident_key, ident) end
  return 1
end
"#
    };
}

/// KEYS: 1 user record, 2 users set, 3 turns list, 4 conversations hash, 5 handled,
/// 6 the user's identity. ARGV: 1 `u` to write the user record, 2 `1` if a record was
/// read, 3 the bytes read, 4 the new record, 5 the user's id (for the set), 6
/// conversation id, 7 conversation (index value), 8 handled entry or empty, 9 handled
/// TTL (s), 10 the sealed identity or empty, 11.. turns.
pub(super) static RECORD_EXCHANGE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        put_user_if_lua!(),
        r#"
if ARGV[1] == 'u' and put_user_if(ARGV[2], ARGV[3], ARGV[4], ARGV[5], KEYS[6], ARGV[10]) == 0 then
  return 0
end
if #ARGV >= 11 then
  for i = 11, #ARGV do redis.call('RPUSH', KEYS[3], ARGV[i]) end
  redis.call('HSETNX', KEYS[4], ARGV[6], ARGV[7])
end
if ARGV[8] ~= '' then
  redis.call('SET', KEYS[5], ARGV[8], 'EX', ARGV[9])
end
return 1
"#
    ))
});

/// KEYS: 1 user record, 2 users set, 3 the user's identity. ARGV: 1 `1` if a record
/// was read, 2 the bytes read, 3 the new record, 4 the user's id, 5 the sealed identity
/// or empty.
pub(super) static PUT_USER_IF: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        put_user_if_lua!(),
        "return put_user_if(ARGV[1], ARGV[2], ARGV[3], ARGV[4], KEYS[3], ARGV[5])\n"
    ))
});

/// Deletes `KEYS[1]` only if it still holds `ARGV[1]` (a username still pointing at
/// the user who drops it).
pub(super) static DEL_IF: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});
