"""Create the stack's bucket and Prefect blocks, and the alert automations; safe to run again (make stack calls it
each time).

With --alerts-url (make stack passes $LORAFLOW_ALERTS_URL), a Custom Webhook notification block `loraflow-alerts`
POSTs each alert to that URL as JSON {"subject", "body", "text"} (Slack and Teams incoming webhooks read "text"; a
pager or anything else reads the rest), and every automation in infra/automations/ that names it
(`block_document_id: notification-block:loraflow-alerts`) is created with the block's id, replacing an earlier
automation of the same name, so rerunning never duplicates one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.exceptions import ClientError
from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters

AUTOMATIONS = Path(__file__).resolve().parents[1] / "automations"
BLOCK_REFERENCE = "notification-block:"
ALERTS_BLOCK = "loraflow-alerts"


def alerts_block(url: str) -> Any:
    """The notification block alerts go through: one POST per alert, JSON with the subject and the body."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(
        name=ALERTS_BLOCK, url=url, method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}", "text": "{{subject}}\n{{body}}"},
    )


def with_block_ids(automation: dict[str, Any], block_ids: dict[str, str]) -> dict[str, Any]:
    """The automation with each `notification-block:<name>` reference replaced by that block's id."""
    for action in automation.get("actions", []):
        reference = str(action.get("block_document_id", ""))
        if reference.startswith(BLOCK_REFERENCE):
            action["block_document_id"] = block_ids[reference[len(BLOCK_REFERENCE):]]
    return automation


def alert_automations() -> list[dict[str, Any]]:
    """The automations in infra/automations/ that send through a notification block."""
    found = []
    for path in sorted(AUTOMATIONS.glob("*.yaml")):
        automation = yaml.safe_load(path.read_text())
        if any(str(a.get("block_document_id", "")).startswith(BLOCK_REFERENCE) for a in automation.get("actions", [])):
            found.append(automation)
    return found


def create_alerts(url: str) -> list[str]:
    """The alerts block and its automations (each replacing one of the same name); returns their names."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    block_id = str(alerts_block(url).save(ALERTS_BLOCK, overwrite=True))
    names = []
    with get_client(sync_client=True) as client:
        for raw in alert_automations():
            automation = AutomationCore.model_validate(with_block_ids(raw, {ALERTS_BLOCK: block_id}))
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
            names.append(automation.name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", help="the stack's bucket (created if missing), and the S3 blocks for it")
    parser.add_argument("--alerts-url", default=os.environ.get("LORAFLOW_ALERTS_URL"),
                        help="where alerts are POSTed (default $LORAFLOW_ALERTS_URL); none: no alert automations")
    parser.add_argument("--alerts-only", action="store_true",
                        help="only the alerts block and automations (a server whose bucket and blocks exist)")
    args = parser.parse_args()
    if args.alerts_only:
        if not args.alerts_url:
            parser.error("--alerts-only needs --alerts-url (or LORAFLOW_ALERTS_URL)")
        names = create_alerts(args.alerts_url)
        print(f"  alerts: block {ALERTS_BLOCK} -> {args.alerts_url}; automations: {', '.join(names)}")
        return
    if not args.bucket:
        parser.error("--bucket is required (or --alerts-only)")
    s3 = boto3.client("s3")  # AWS_ENDPOINT_URL and the keys come from the environment
    try:
        s3.head_bucket(Bucket=args.bucket)
    except ClientError:
        s3.create_bucket(Bucket=args.bucket)
    credentials = AwsCredentials(
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_client_parameters=AwsClientParameters(endpoint_url=os.environ["AWS_ENDPOINT_URL"]),
    )
    credentials.save("loraflow-s3", overwrite=True)
    S3Bucket(bucket_name=args.bucket, credentials=credentials).save("loraflow-artifacts", overwrite=True)
    print(f"  bucket s3://{args.bucket} and blocks loraflow-s3, loraflow-artifacts: ready")
    if args.alerts_url:
        names = create_alerts(args.alerts_url)
        print(f"  alerts: block {ALERTS_BLOCK} -> {args.alerts_url}; automations: {', '.join(names)}")
    else:
        print("  alerts: off (set LORAFLOW_ALERTS_URL to a webhook URL: Slack, Teams, a pager)")


if __name__ == "__main__":
    main()
