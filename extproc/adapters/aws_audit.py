"""Audit records to AWS: payloads to S3, one DynamoDB item per execution (the only module importing boto3).

S3: one gzip JSON Lines object per shipped spool segment, date and model,
`<prefix>/date=YYYY-MM-DD/model=<model>/<segment>.jsonl.gz` (see `audit.objects`).
Objects of the first layout, one record each at `…/<request_id>.json`, stay readable.

DynamoDB table: partition key `request_id` (S), no sort key → get by request id.
Global secondary index `model-timestamp`: partition key `model` (S), sort key
`timestamp` (S, fixed-width ISO UTC, so string order is time order), projection
ALL → list by model and time range. Items hold `audit.summary` plus `s3_key`,
`s3_range` (the HTTP Range of the record's gzip member) and `s3_line` (its line
there), so `audit show` is one item read and one ranged GET.

Keys are deterministic and compression too, so re-shipping a segment rewrites the
same object and items and never duplicates. S3 is written before DynamoDB: an item
never points at a missing object. botocore errors become `AuditSinkUnavailable`
here and nowhere else.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import boto3
import orjson
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from extproc.audit.objects import Location, PackedObject, pack_batch, record_at
from extproc.audit.record import AuditSinkUnavailable, Record, summary
from extproc.registry import AwsAuditSink

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_s3.client import S3Client

GSI_MODEL_TIME = "model-timestamp"
BATCH_LIMIT = 25  # batch_write_item's maximum
UNPROCESSED_ATTEMPTS = 8
UNPROCESSED_BACKOFF_S = 0.05
READER_TIMEOUT_S = 30.0
# Threads for S3 puts and DynamoDB batches: both are network waits.
AWS_PARALLEL = 8

NUMERIC = ("status", "latency_ms", "s3_line")


def dynamo_item(meta: dict[str, Any], where: Location) -> dict[str, dict[str, str]]:
    """A summary and where its record is, as a DynamoDB item; nulls are left out (DynamoDB has no use for them)."""
    located = {**meta, "s3_key": where.key, "s3_range": where.range, "s3_line": where.line}
    return {
        name: {"N": str(value)} if name in NUMERIC else {"S": str(value)}
        for name, value in located.items()
        if value is not None
    }


# Where the body encoded before botocore's serializer runs waits for its request (a per-call dict).
_ENCODED_BODY = "model_broker_encoded_body"


def encode_batch_write(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """`before-parameter-build` of BatchWriteItem: the JSON body encoded once by orjson.

    botocore's serializer walks every attribute of every item against the API model
    (~20 µs per item, measured), to produce what `orjson.dumps` writes in 0.5 µs: for
    the JSON protocol the body is the parameters themselves. Each table's items are
    taken out of what botocore serializes (the table names stay, for endpoint rules).
    """
    context[_ENCODED_BODY] = orjson.dumps(params)
    params["RequestItems"] = {table: [] for table in params["RequestItems"]}


def use_encoded_body(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    """`before-call`, after serialization and before signing: the request carries the encoded body."""
    body = context.pop(_ENCODED_BODY, None)
    if body is not None:
        params["body"] = body


def from_dynamo_item(item: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, typed in item.items():
        ((kind, value),) = typed.items()
        out[name] = orjson.loads(value) if kind == "N" else value  # "200" → 200, "1.5" → 1.5
    return out


def reader_budget(conf: AwsAuditSink) -> float:
    """A person reading the trail (`audit show|list`) would rather wait than fail: a listing pages through
    an index, so it gets at least READER_TIMEOUT_S per call where the shipper keeps the sink's own budget."""
    return max(conf.timeout_ms / 1000, READER_TIMEOUT_S)


def chunks(items: Sequence[dict[str, Any]], size: int) -> Iterator[Sequence[dict[str, Any]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class AwsAuditStore:
    """Sink and reader; boto3 clients are thread-safe, and every call has the configured time budget."""

    def __init__(self, conf: AwsAuditSink, *, timeout_s: float) -> None:
        # Few retries inside a call: the shipper's own backoff handles outages.
        config = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
            max_pool_connections=AWS_PARALLEL * 2,
            # Items and objects are built here, never from input: botocore's own checking of each
            # call cost ~40 µs of broker CPU per record shipped (measured), for nothing.
            parameter_validation=False,
        )
        session = boto3.session.Session()
        self._s3: S3Client = session.client(
            "s3", region_name=conf.region, endpoint_url=conf.endpoint_url, config=config
        )
        self._ddb: DynamoDBClient = session.client(
            "dynamodb", region_name=conf.region, endpoint_url=conf.endpoint_url, config=config
        )
        events = self._ddb.meta.events
        events.register("before-parameter-build.dynamodb.BatchWriteItem", encode_batch_write)
        events.register("before-call.dynamodb.BatchWriteItem", use_encoded_body)
        self._conf = conf
        self._pool = ThreadPoolExecutor(AWS_PARALLEL, thread_name_prefix="audit-aws")

    def put(self, batch_id: str, records: Sequence[Record]) -> None:
        """One object per date and model of the segment, then one item per record pointing into it."""
        objects = pack_batch(self._conf.prefix, batch_id, records)
        # pack_batch keeps one record per request id: batch_write_item refuses duplicate keys in one call.
        items = [dynamo_item(summary(r), o.locations[r["request_id"]]) for o in objects for r in o.records]
        try:
            list(self._pool.map(self._put_object, objects))
            list(self._pool.map(self._write_items, chunks(items, BATCH_LIMIT)))
        except (BotoCoreError, ClientError) as exc:
            raise AuditSinkUnavailable(f"aws: {exc}") from None

    def _put_object(self, packed: PackedObject) -> None:
        self._s3.put_object(
            Bucket=self._conf.bucket,
            Key=packed.key,
            Body=packed.body,
            ContentType="application/x-ndjson",
            ContentEncoding="gzip",
        )

    def _write_items(self, chunk: Sequence[dict[str, Any]]) -> None:
        """One batch_write_item of up to 25; unprocessed items retried with exponential backoff."""
        table = self._conf.table
        pending: list[Any] = [{"PutRequest": {"Item": item}} for item in chunk]
        for attempt in range(UNPROCESSED_ATTEMPTS):
            answer = self._ddb.batch_write_item(RequestItems={table: pending})
            pending = list(answer.get("UnprocessedItems", {}).get(table, []))
            if not pending:
                return
            time.sleep(UNPROCESSED_BACKOFF_S * 2**attempt)
        raise AuditSinkUnavailable(f"dynamodb left {len(pending)} item(s) unprocessed")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def show(self, request_id: str) -> Record | None:
        try:
            found = self._ddb.get_item(TableName=self._conf.table, Key={"request_id": {"S": request_id}})
            if "Item" not in found:
                return None
            item = from_dynamo_item(found["Item"])
            where = {"Range": item["s3_range"]} if "s3_range" in item else {}
            body = self._s3.get_object(Bucket=self._conf.bucket, Key=item["s3_key"], **where)["Body"].read()
        except (BotoCoreError, ClientError) as exc:
            raise AuditSinkUnavailable(f"aws: {exc}") from None
        if "s3_range" not in item:  # the first layout: one object per record
            old: Record = orjson.loads(body)
            return old
        record = record_at(body, item["s3_line"])
        if record is None or record["request_id"] != request_id:
            raise AuditSinkUnavailable(f"s3: {item['s3_key']} {item['s3_range']} does not hold {request_id}")
        return record

    def by_model(self, model: str, since: str, until: str) -> list[dict[str, Any]]:
        query: dict[str, Any] = {
            "TableName": self._conf.table,
            "IndexName": GSI_MODEL_TIME,
            # BETWEEN is inclusive; `until` is exclusive, filtered below.
            "KeyConditionExpression": "#m = :m AND #t BETWEEN :since AND :until",
            "ExpressionAttributeNames": {"#m": "model", "#t": "timestamp"},
            "ExpressionAttributeValues": {":m": {"S": model}, ":since": {"S": since}, ":until": {"S": until}},
        }
        found: list[dict[str, Any]] = []
        try:
            while True:
                page = self._ddb.query(**query)
                found += [from_dynamo_item(item) for item in page["Items"]]
                if "LastEvaluatedKey" not in page:
                    break
                query["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        except (BotoCoreError, ClientError) as exc:
            raise AuditSinkUnavailable(f"aws: {exc}") from None
        return [item for item in found if item["timestamp"] < until]

    def create_resources(self) -> None:
        """The bucket and the table with its index, if missing (`model-broker audit init`)."""
        try:
            with contextlib.suppress(self._s3.exceptions.BucketAlreadyOwnedByYou):
                self._s3.create_bucket(Bucket=self._conf.bucket, **_bucket_location(self._conf.region))
            with contextlib.suppress(self._ddb.exceptions.ResourceInUseException):
                self._ddb.create_table(
                    TableName=self._conf.table,
                    BillingMode="PAY_PER_REQUEST",
                    AttributeDefinitions=[
                        {"AttributeName": "request_id", "AttributeType": "S"},
                        {"AttributeName": "model", "AttributeType": "S"},
                        {"AttributeName": "timestamp", "AttributeType": "S"},
                    ],
                    KeySchema=[{"AttributeName": "request_id", "KeyType": "HASH"}],
                    GlobalSecondaryIndexes=[
                        {
                            "IndexName": GSI_MODEL_TIME,
                            "KeySchema": [
                                {"AttributeName": "model", "KeyType": "HASH"},
                                {"AttributeName": "timestamp", "KeyType": "RANGE"},
                            ],
                            "Projection": {"ProjectionType": "ALL"},
                        }
                    ],
                )
            self._ddb.get_waiter("table_exists").wait(TableName=self._conf.table)
        except (BotoCoreError, ClientError) as exc:
            raise AuditSinkUnavailable(f"aws: {exc}") from None


def _bucket_location(region: str) -> dict[str, Any]:
    """us-east-1 is the one region that refuses an explicit location constraint."""
    return {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
