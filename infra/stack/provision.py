"""Create the stack's bucket and Prefect blocks; safe to run again (make stack calls it each time)."""

from __future__ import annotations

import argparse
import os

import boto3
from botocore.exceptions import ClientError
from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
