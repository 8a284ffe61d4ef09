// OpenSSL's libcrypto (Debian's libssl-dev), for the SHA-256 of images.
#include <openssl/evp.h>
