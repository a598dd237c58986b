"""The forms of a credential inside a URI that the app refuses (app.credentials), each holding SECRET, the
text that must never be printed; and URIs that hold none. Shared by the config's, run's and submit's tests."""

SECRET = "wJalrXUtnFEMIK7MDENG"

# (URI, the form the refusal names)
CREDENTIAL_FORMS = [
    (f"s3://AKIAEXAMPLE:{SECRET}@bucket/prefix", "user:password@ in its URI"),
    (f"s3://AKIAEXAMPLE:{SECRET}/bPxRfi+CY@bucket/prefix", "user:password@ in its URI"),  # AWS secrets hold slashes
    (f"s3://:{SECRET}@bucket/prefix", "user:password@ in its URI"),  # an empty user
    (f"s3://AKIAEXAMPLE:1234/{SECRET}@bucket/prefix", "user:password@ in its URI"),  # digits first: not a port on S3
    (f"https://user:2024{SECRET}@models.example.com/w.pt", "user:password@ in its URI"),
    (f"https://b.s3.amazonaws.com/w.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SECRET}", "X-Amz-Signature= in its query string"),
    (f"https://b.s3.amazonaws.com/w.pt?x-amz-credential={SECRET}", "x-amz-credential= in its query string"),
    (f"https://b.s3.amazonaws.com/w.pt?X-Amz-Security-Token={SECRET}", "X-Amz-Security-Token= in its query string"),
    (f"https://acct.blob.core.windows.net/c/w.pt?sv=2022-11-02&sp=r&SIG={SECRET}", "SIG= in its query string"),
    (f"https://models.example.com/w.pt?client_secret={SECRET}", "client_secret= in its query string"),
    (f"https://models.example.com/w.pt?a=1&Access_Token={SECRET}", "Access_Token= in its query string"),
    (f"https://models.example.com/w.pt?token={SECRET}", "token= in its query string"),
    (f"https://models.example.com/w.pt?PASSWORD={SECRET}", "PASSWORD= in its query string"),
]
FORM_IDS = ["user-info", "slash", "empty-user", "digits-slash", "digits", "amz-signature", "amz-credential",
            "amz-token", "sas-sig", "client-secret", "access-token", "token", "password"]

WITHOUT_CREDENTIALS = [
    "s3://bucket/a:b@c.jpg", "s3://bucket/prefix", "gs://bucket/x", "/data/a:b@c", "https://host:8080/w.pt",
    "https://host:8080/a@b.pt", "s3://anonymous@air-example-data/AnimalDetection",
    "abfs://container@account.dfs.core.windows.net/images", "hdfs://namenode:8020/data/a@b.jpg",
    "https://models.example.com/w.pt?token=", "https://models.example.com/w.pt?mytoken=x&tokens=y",
]


def refusal(key: str, form: str) -> str:
    """app.credentials' one line for a setting holding a credential of this form."""
    return (f"{key} holds credentials ({form}); give them to the storage client through its environment "
            "(AWS_ACCESS_KEY_ID, ...) or a mounted Secret instead")
