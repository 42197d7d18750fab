//! The object sink: image bytes to an S3-compatible store (Supabase Storage,
//! MinIO, AWS) with path-style addressing, at deterministic keys, verified by
//! a HEAD (size, and the MD5 ETag where the store gives one) before the image
//! counts as uploaded.

use super::UpstreamError;
use crate::config::UpstreamConfig;
use crate::store::CaptureRecord;
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::{Bucket, Region};
use std::time::Duration;

/// `device-observations/{site_id}/{device_id}/{timestamp}_{image_name}`;
/// a second image under the same name (version 2, …) gets `_v{n}` after the
/// timestamp so it never overwrites the first.
pub fn object_key(site: &str, c: &CaptureRecord) -> String {
    let ts = c
        .device_time
        .unwrap_or(c.first_seen_at)
        .format("%Y%m%dT%H%M%SZ");
    let version = if c.version > 1 {
        format!("_v{}", c.version)
    } else {
        String::new()
    };
    format!(
        "device-observations/{}/{}/{ts}{version}_{}",
        safe(site),
        safe(&c.mac),
        safe(&c.image_name)
    )
}

/// Names come from devices: keep them to one path segment of plain characters.
fn safe(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.chars().all(|c| c == '.') {
        "_".into()
    } else {
        out
    }
}

fn s3_error(e: S3Error) -> UpstreamError {
    match e {
        S3Error::HttpFailWithBody(code @ (401 | 403), body) => {
            UpstreamError::ObjectsAuth(format!("HTTP {code}: {}", short(&body)))
        }
        S3Error::HttpFailWithBody(code, body) => {
            UpstreamError::Objects(format!("HTTP {code}: {}", short(&body)))
        }
        other => UpstreamError::Objects(other.to_string()),
    }
}

fn short(body: &str) -> String {
    // The S3 error XML's <Code>/<Message> are what matter.
    let pick = |tag: &str| {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&close)? + start;
        Some(body[start..end].to_string())
    };
    match (pick("Code"), pick("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => body.chars().take(200).collect(),
    }
}

pub struct ObjectSink {
    bucket: Box<Bucket>,
    endpoint: String,
    name: String,
    image_url: String,
    public_base_url: String,
    presign_expiry_s: u32,
}

impl ObjectSink {
    pub fn new(cfg: &UpstreamConfig) -> Result<ObjectSink, UpstreamError> {
        let region = Region::Custom {
            region: cfg.region.clone(),
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
        };
        let creds = Credentials::new(
            Some(&cfg.access_key),
            Some(&cfg.secret_key),
            None,
            None,
            None,
        )
        .map_err(|e| UpstreamError::Config(format!("upstream credentials: {e}")))?;
        let bucket = Bucket::new(&cfg.bucket, region, creds)
            .map_err(|e| UpstreamError::Config(format!("upstream.bucket: {e}")))?
            .with_path_style()
            .with_request_timeout(Duration::from_secs(60))
            .map_err(s3_error)?;
        Ok(ObjectSink {
            bucket,
            endpoint: cfg.endpoint.trim_end_matches('/').to_string(),
            name: cfg.bucket.clone(),
            image_url: cfg.image_url.clone(),
            public_base_url: cfg.public_base_url.trim_end_matches('/').to_string(),
            presign_expiry_s: cfg.presign_expiry_s,
        })
    }

    /// `device_images.image_url` per `upstream.image_url`: `path` (the
    /// path-style object URL, which needs the store's credentials to read),
    /// `public` (`public_base_url/key`, for a public bucket or a CDN) or
    /// `presigned` (a signed GET URL that expires after `presign_expiry_s`;
    /// the row keeps `object_key` to sign a new one later).
    pub async fn url(&self, key: &str) -> Result<String, UpstreamError> {
        match self.image_url.as_str() {
            "public" => Ok(format!("{}/{key}", self.public_base_url)),
            "presigned" => self
                .bucket
                .presign_get(format!("/{key}"), self.presign_expiry_s, None)
                .await
                .map_err(s3_error),
            _ => Ok(format!("{}/{}/{key}", self.endpoint, self.name)),
        }
    }

    /// Checks that the store answers and takes the credentials, without
    /// writing: a GET of a key that does not exist answers 404 (NoSuchKey),
    /// or 403 AccessDenied for a key without list permission; a wrong key
    /// or secret answers InvalidAccessKeyId / SignatureDoesNotMatch.
    pub async fn check(&self) -> Result<(), UpstreamError> {
        match self.bucket.get_object(".barngate-connection-check").await {
            Ok(_) => Ok(()),
            Err(S3Error::HttpFailWithBody(404, body)) if body.contains("NoSuchBucket") => {
                Err(UpstreamError::Objects(format!(
                    "bucket {} does not exist (create it with `barngate upstream migrate`)",
                    self.name
                )))
            }
            Err(S3Error::HttpFailWithBody(404, _)) => Ok(()),
            Err(S3Error::HttpFailWithBody(403, body))
                if !body.contains("InvalidAccessKeyId")
                    && !body.contains("SignatureDoesNotMatch")
                    && body.contains("AccessDenied") =>
            {
                Ok(())
            }
            Err(e) => Err(s3_error(e)),
        }
    }

    /// Creates the bucket unless it is already there (`upstream
    /// init-schema`); `true` when it was created. S3 takes no
    /// LocationConstraint for us-east-1 and rust-s3 sends one for every
    /// custom endpoint's region, so the request is built here, with the
    /// constraint only for other regions.
    pub async fn ensure_bucket(&self, region: &str) -> Result<bool, UpstreamError> {
        use s3::bucket_ops::BucketConfiguration;
        use s3::command::Command;
        use s3::request::tokio_backend::ReqwestRequest;
        use s3::request::Request as _;
        // A one-key listing tells whether the bucket is there (CreateBucket
        // cannot: us-east-1 answers 200 for one's own existing bucket).
        match self
            .bucket
            .list_page(String::new(), None, None, None, Some(1))
            .await
        {
            Ok(_) => return Ok(false),
            Err(S3Error::HttpFailWithBody(404, _)) => {}
            Err(e) => return Err(s3_error(e)),
        }
        let mut config = BucketConfiguration::default();
        if region != "us-east-1" {
            config.set_region(self.bucket.region());
        }
        let request = ReqwestRequest::new(&self.bucket, "", Command::CreateBucket { config })
            .await
            .map_err(s3_error)?;
        match request.response_data(false).await {
            Ok(_) => Ok(true),
            // Created meanwhile by this account: nothing to do. Any other
            // conflict (BucketAlreadyExists: the name is someone else's) is
            // an error that names the bucket.
            Err(S3Error::HttpFailWithBody(409, body))
                if body.contains("BucketAlreadyOwnedByYou") =>
            {
                Ok(false)
            }
            Err(S3Error::HttpFailWithBody(409, body)) => Err(UpstreamError::Objects(format!(
                "bucket {} cannot be created: HTTP 409: {}",
                self.name,
                short(&body)
            ))),
            Err(e) => Err(s3_error(e)),
        }
    }

    /// Uploads (overwriting the same key is what makes a retry harmless) and
    /// verifies the stored object.
    pub async fn put_verified(&self, key: &str, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.bucket
            .put_object_with_content_type(key, bytes, "image/jpeg")
            .await
            .map_err(s3_error)?;
        self.verify(key, bytes).await
    }

    async fn verify(&self, key: &str, bytes: &[u8]) -> Result<(), UpstreamError> {
        let (head, status) = self.bucket.head_object(key).await.map_err(s3_error)?;
        let fail = |message: String| UpstreamError::Verify {
            key: key.to_string(),
            message,
        };
        if status != 200 {
            return Err(fail(format!("HEAD answered {status}")));
        }
        if head.content_length != Some(bytes.len() as i64) {
            return Err(fail(format!(
                "stored size {:?}, expected {}",
                head.content_length,
                bytes.len()
            )));
        }
        // A single-part upload's ETag is the MD5 of the content.
        if let Some(etag) = head.e_tag.as_deref() {
            let etag = etag.trim_matches('"');
            if etag.len() == 32 && etag.chars().all(|c| c.is_ascii_hexdigit()) {
                let md5 = format!("{:x}", md5::compute(bytes));
                if !etag.eq_ignore_ascii_case(&md5) {
                    return Err(fail(format!("stored MD5 {etag}, expected {md5}")));
                }
            }
        }
        Ok(())
    }
}
