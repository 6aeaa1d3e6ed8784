// Command ociimage writes a one-layer container image, as a tar archive that
// `ctr images import` reads, from files on this machine. The local node uses
// it for every image it runs (pause, the test agent, the operator): no image
// is pulled from anywhere.
//
//	ociimage -name agenttoken.local/agent:e2e -out agent.tar \
//	  -entrypoint '["/agent"]' -file /agent=./agent -file /bin/kill=./agent
package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path"
	"sort"
	"strings"
)

type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

func main() {
	var fileArgs files
	name := flag.String("name", "", "image reference, e.g. agenttoken.local/agent:e2e")
	out := flag.String("out", "", "archive to write")
	entrypoint := flag.String("entrypoint", "", "entrypoint as a JSON array")
	user := flag.String("user", "", "user the image runs as (numeric uid[:gid])")
	flag.Var(&fileArgs, "file", "DEST=SRC: put the file SRC at DEST in the image (repeatable)")
	flag.Parse()
	if *name == "" || *out == "" || *entrypoint == "" || len(fileArgs) == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*name, *out, *entrypoint, *user, fileArgs); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		os.Exit(1)
	}
}

func digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// layer builds an uncompressed layer tar holding the files and their parent
// directories, with fixed times and owners so the same inputs give the same
// digest.
func layer(fileArgs []string) ([]byte, error) {
	entries := map[string]string{}
	for _, f := range fileArgs {
		dest, src, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(dest, "/") {
			return nil, fmt.Errorf("-file %q: want /DEST=SRC", f)
		}
		entries[strings.TrimPrefix(path.Clean(dest), "/")] = src
	}
	dirs := map[string]bool{"tmp": true, "etc": true}
	for dest := range entries {
		for d := path.Dir(dest); d != "."; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	sortedDirs := make([]string, 0, len(dirs))
	for d := range dirs {
		sortedDirs = append(sortedDirs, d)
	}
	sort.Strings(sortedDirs)
	for _, d := range sortedDirs {
		mode := int64(0o755)
		if d == "tmp" {
			mode = 0o1777
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode, Format: tar.FormatPAX}); err != nil {
			return nil, err
		}
	}
	dests := make([]string, 0, len(entries))
	for d := range entries {
		dests = append(dests, d)
	}
	sort.Strings(dests)
	for _, dest := range dests {
		src := entries[dest]
		data, err := os.ReadFile(src)
		if err != nil {
			return nil, err
		}
		st, err := os.Stat(src)
		if err != nil {
			return nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: dest, Mode: int64(st.Mode().Perm()), Size: int64(len(data)), Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func run(name, out, entrypoint, user string, fileArgs []string) error {
	var ep []string
	if err := json.Unmarshal([]byte(entrypoint), &ep); err != nil || len(ep) == 0 {
		return fmt.Errorf("-entrypoint %q: want a non-empty JSON array of strings", entrypoint)
	}
	layerTar, err := layer(fileArgs)
	if err != nil {
		return err
	}
	layerDigest := digest(layerTar)
	config, err := json.Marshal(map[string]any{
		"architecture": "amd64",
		"os":           "linux",
		"config": map[string]any{
			"Entrypoint": ep,
			"Env":        []string{"PATH=/usr/local/bin:/usr/bin:/bin"},
			"User":       user,
		},
		"rootfs": map[string]any{"type": "layers", "diff_ids": []string{layerDigest}},
	})
	if err != nil {
		return err
	}
	configDigest := digest(config)
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.manifest.v1+json",
		"config":        map[string]any{"mediaType": "application/vnd.oci.image.config.v1+json", "digest": configDigest, "size": len(config)},
		"layers":        []any{map[string]any{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layerDigest, "size": len(layerTar)}},
	})
	if err != nil {
		return err
	}
	manifestDigest := digest(manifest)
	index, err := json.Marshal(map[string]any{
		"schemaVersion": 2,
		"mediaType":     "application/vnd.oci.image.index.v1+json",
		"manifests": []any{map[string]any{
			"mediaType": "application/vnd.oci.image.manifest.v1+json",
			"digest":    manifestDigest,
			"size":      len(manifest),
			"platform":  map[string]string{"architecture": "amd64", "os": "linux"},
			"annotations": map[string]string{
				"io.containerd.image.name":          name,
				"org.opencontainers.image.ref.name": name[strings.LastIndex(name, ":")+1:],
			},
		}},
	})
	if err != nil {
		return err
	}
	blob := func(d string) string { return "blobs/sha256/" + strings.TrimPrefix(d, "sha256:") }
	f, err := os.Create(out + ".new")
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	for _, e := range []struct {
		name string
		data []byte
	}{
		{"oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)},
		{"index.json", index},
		{blob(configDigest), config},
		{blob(manifestDigest), manifest},
		{blob(layerDigest), layerTar},
	} {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: e.name, Mode: 0o644, Size: int64(len(e.data))}); err != nil {
			return err
		}
		if _, err := tw.Write(e.data); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(out+".new", out)
}
