"""Redis ACLs: nobody gets in anonymously; services are confined to their own key prefix."""

from bastion.devstack.components.redis import acl_lines


def test_default_user_is_disabled_and_services_are_confined() -> None:
    lines = acl_lines({"payments": "p1", "accounts": "a1"}, admin_password="root-pw")
    assert lines[0] == "user default off"
    confined = "+@all -@dangerous -scan -randomkey -client|tracking"
    assert f"user accounts on >a1 resetchannels ~accounts:* &accounts:* {confined}" in lines
    assert f"user payments on >p1 resetchannels ~payments:* &payments:* {confined}" in lines
    assert not any(line.startswith("user default on") for line in lines)
