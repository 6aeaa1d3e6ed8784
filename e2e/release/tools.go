//go:build tools

// Package tools pins the release tools built from their Go modules by
// hack/release-tools: cosign (signs and verifies the image and the chart,
// attaches the SBOM attestation) and actionlint (checks the release workflow
// in `make lint`). Nothing here is compiled into the project.
package tools

import (
	_ "github.com/rhysd/actionlint/cmd/actionlint"
	_ "github.com/sigstore/cosign/v3/cmd/cosign"
)
