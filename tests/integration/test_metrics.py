"""Every service's counters are readable over its metrics endpoint, and only over mutual TLS: a refused call is
counted where an operator (here, the cli identity) can see it; a client without a dev-CA certificate, or speaking
plaintext, reads nothing."""

import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from bastion.accounts.v1 import accounts_pb2, accounts_pb2_grpc
from bastion.devstack.catalog import load_services
from bastion.devstack.context import StackContext
from bastion.grpc.channels import channel_credentials
from bastion.metrics_endpoint import sample_value, scrape
from bastion.settings import PROJECT_ROOT
from tests.integration.conftest import TEST_ENV
from tests.integration.grpc_harness import tls_of

REFUSED = "bastion_grpc_refused_total"
LIST_ACCOUNTS = "/bastion.accounts.v1.Accounts/ListAccounts"
DECLARED_SERVICES = [entry.name for entry in load_services(PROJECT_ROOT / "infra" / "services.yaml")]


def metrics_url(ctx: StackContext, service: str) -> str:
    return f"https://{ctx.settings.public_host}:{ctx.metrics_port(service)}/metrics"


def refused_count(ctx: StackContext) -> float:
    text = scrape(metrics_url(ctx, "accounts"), tls_of(ctx, "cli"))
    labels = {"service": "accounts", "method": LIST_ACCOUNTS, "code": "UNAUTHENTICATED"}
    return sample_value(text, REFUSED, labels) or 0.0


@pytest.mark.parametrize("service", DECLARED_SERVICES)
def test_each_service_serves_its_counters_to_a_dev_ca_client(stack: Any, ctx: StackContext, service: str) -> None:
    text = scrape(metrics_url(ctx, service), tls_of(ctx, "cli"))
    assert "# TYPE bastion_grpc_refused_total counter" in text


def test_a_refused_call_is_counted_where_an_operator_reads_it(stack: Any, ctx: StackContext) -> None:
    before = refused_count(ctx)
    channel = grpc.secure_channel(ctx.grpc_address("accounts"),
                                  channel_credentials(tls_of(ctx, "cli")))
    with pytest.raises(grpc.RpcError) as refused:
        accounts_pb2_grpc.AccountsStub(channel).ListAccounts(accounts_pb2.ListAccountsRequest(), timeout=10)
    channel.close()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused_count(ctx) == before + 1
    shown = subprocess.run([sys.executable, "-m", "bastion.cli", "metrics", "accounts", "--match", REFUSED],
                           env={**os.environ, **TEST_ENV}, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert any(LIST_ACCOUNTS in line and 'code="UNAUTHENTICATED"' in line for line in shown.stdout.splitlines())


def test_no_client_certificate_or_plaintext_reads_nothing(stack: Any, ctx: StackContext) -> None:
    url = metrics_url(ctx, "accounts")
    no_certificate = ssl.create_default_context(cafile=str(ctx.ca_file))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=5, context=no_certificate).read()  # noqa: S310
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(url.replace("https://", "http://"), timeout=5).read()  # noqa: S310
