"""The data keys of personal fields (bastion/events/field_crypto.py) as the operator handles them: kept in the
issuer's ring, rotated and retired there, and handed to exactly the services infra/personal-data.yaml entitles.

Services read their copy on every use (a change holds at the next field, no restart); readers get a new key before
its producers; retiring a key deletes it everywhere, so the event copies of what it sealed are shredded.
"""

import shutil
from dataclasses import dataclass

from bastion.devstack.errors import DevstackError
from bastion.devstack.layout import StateLayout
from bastion.devstack.writer_lock import writer_lock
from bastion.events.field_crypto import DataKeyRing, DataKeyState
from bastion.events.personal_data import PersonalDataPolicy

ISSUER = "issuer"  # the ring that holds every data key; services hold copies under their own names


@dataclass(frozen=True)
class ListedKey:
    topic: str
    key_id: str
    state: DataKeyState
    created_at: str
    holders: tuple[str, ...]  # the services whose copy holds the key


class DataKeys:
    """The issuer's data keys and the services' copies of them, for one install."""

    def __init__(self, layout: StateLayout, personal: PersonalDataPolicy, services: list[str]) -> None:
        self.folder = layout.data_keys_dir
        self.personal = personal
        self.services = services
        self.issuer = DataKeyRing(self.folder / ISSUER)

    def ensure(self) -> None:
        """Give every topic with personal fields an active key, then hand the keys out (idempotent)."""
        with writer_lock(self.folder):
            self.issuer.ensure(sorted(self.personal.topics))
            self.distribute()

    def distribute(self) -> None:
        """Make each service's copy hold exactly the issuer's non-retired keys of the topics it is entitled to;
        a topic no longer entitled loses its copy. Readers of a topic are served before its producers."""
        with writer_lock(self.folder):
            for topic in sorted(self.personal.topics):
                for service in self.handover_order(topic):
                    self.issuer.export_to(self.folder / service, topic)
            # Every holder's folder, not only today's services: a service removed from infra/services.yaml keeps
            # no key.
            for held in self.folder.iterdir():
                if not held.is_dir() or held.name == ISSUER:
                    continue
                entitled = self.personal.key_topics(held.name) if held.name in self.services else []
                for folder in held.iterdir():
                    if folder.is_dir() and folder.name not in entitled:
                        shutil.rmtree(folder)

    def handover_order(self, topic: str) -> list[str]:
        """The services entitled to TOPIC's keys, readers first: a producer seals under a new key only once every
        reader holds it."""
        producers = self.personal.topics[topic].producers
        entitled = [service for service in self.services if topic in self.personal.key_topics(service)]
        return sorted(entitled, key=lambda service: (service in producers, service))

    def state(self, topic: str, key_id: str) -> DataKeyState | None:
        """KEY_ID's state among TOPIC's keys, or None when TOPIC has no such key (or no personal fields)."""
        return self.issuer.states(topic).get(key_id) if topic in self.personal.topics else None

    def producers(self, topic: str) -> tuple[str, ...]:
        """The services that seal TOPIC's personal fields (infra/event-access.yaml)."""
        return self.personal.topics[topic].producers

    def rotate(self, topic: str) -> str:
        """A new active key for TOPIC, handed out; the previous one still opens what it sealed."""
        self._known(topic)  # before the lock, which would make the folder: nothing is created before setup
        with writer_lock(self.folder):  # one operator change of the keys at a time, handed out before the next
            self._known(topic)
            key_id = self.issuer.rotate(topic)
            self.distribute()
            return key_id

    def retire(self, topic: str, key_id: str) -> None:
        """Delete KEY_ID of TOPIC from the issuer and every copy (DataKeyError if it is unknown or active)."""
        self._known(topic)
        with writer_lock(self.folder):
            self._known(topic)
            self.issuer.retire(topic, key_id)
            self.distribute()

    def listing(self) -> list[ListedKey]:
        """Every key of every topic with personal fields, oldest first, with the services holding it."""
        listed = []
        for topic in sorted(self.personal.topics):
            created = self.issuer.created(topic)
            for key_id, state in self.issuer.states(topic).items():
                holders = tuple(service for service in self.services
                                if DataKeyRing(self.folder / service).get(topic, key_id) is not None)
                listed.append(ListedKey(topic, key_id, state, created[key_id], holders))
        return sorted(listed, key=lambda key: (key.topic, key.created_at, key.key_id))

    def _known(self, topic: str) -> None:
        if topic not in self.personal.topics:
            raise DevstackError(f"{topic!r} has no personal fields, so no data keys",
                                f"name one of {sorted(self.personal.topics)} (infra/personal-data.yaml)")
        if not self.issuer.states(topic):
            raise DevstackError(f"no data keys of {topic} yet", "run `make setup` (or `bastion setup`) first")
