// Probe: does the guest's CPUID (CPL0 emulated, CPL3 native) follow KVM_SET_CPUID2 for leaf 7?
// ./cpuid7 [user] [setpku] [clearavx512]
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#define MEMSZ (16ul<<20)
int main(int argc,char**argv){
  int user=0,setpku=0,clr=0; for(int i=1;i<argc;i++){ if(!strcmp(argv[i],"user"))user=1; if(!strcmp(argv[i],"setpku"))setpku=1; if(!strcmp(argv[i],"clearavx512"))clr=1;}
  int kvm=open("/dev/kvm",O_RDWR|O_CLOEXEC); int vm=ioctl(kvm,KVM_CREATE_VM,0);
  ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
  uint8_t*mem=mmap(NULL,MEMSZ,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
  struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=MEMSZ,.userspace_addr=(unsigned long)mem};
  ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
  uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0x00af9b000000ffffull; gdt[2]=0x00cf93000000ffffull; gdt[3]=0x008f8b000000ffffull;
  gdt[4]=0x00cff3000000ffffull; gdt[5]=0x00affb000000ffffull;
  uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
  pml4[0]=0xa000|7; pdpt[0]=0xb000|7; for(int i=0;i<8;i++) pd[i]=((uint64_t)i<<21)|0x87;
  int vcpu=ioctl(vm,KVM_CREATE_VCPU,0);
  struct kvm_run*run=mmap(NULL,ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0),PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
  struct {struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[100];} cp={.c.nent=100};
  ioctl(kvm,KVM_GET_SUPPORTED_CPUID,&cp);
  for(int i=0;i<cp.c.nent;i++){ struct kvm_cpuid_entry2*e=&cp.e[i];
    if(e->function==1) printf("supported leaf1 ecx %08x\n",e->ecx);
    if(e->function==7&&e->index==0){ printf("supported leaf7 ebx %08x ecx %08x\n",e->ebx,e->ecx); if(setpku) e->ecx|=1<<3; if(clr) e->ebx&=~(1u<<16); }}
  if(ioctl(vcpu,KVM_SET_CPUID2,&cp)<0)perror("setcpuid");
  struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
  struct kvm_segment cs={.base=0,.limit=0xfffff,.selector=8,.type=11,.present=1,.s=1,.l=1,.g=1};
  struct kvm_segment ds={.base=0,.limit=0xfffff,.selector=0x10,.type=3,.present=1,.db=1,.s=1,.g=1};
  struct kvm_segment tr={.base=0,.limit=0xfffff,.selector=0x18,.type=11,.present=1,.g=1};
  if(user){cs.selector=0x2b;cs.dpl=3;ds.selector=0x23;ds.dpl=3;}
  s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.tr=tr; s.gdt.base=0x500; s.gdt.limit=47;
  s.cr0=0x80000033; s.cr3=0x9000; s.cr4=0x20|(1<<18); s.efer=0x500;
  if(setpku) s.cr4|=1<<22;
  if(ioctl(vcpu,KVM_SET_SREGS,&s)<0) perror("sregs (PKE refused?)");
  // cpuid(7,0): out 0x81 ebx; out 0x82 ecx
  uint8_t code[]={0xb8,7,0,0,0, 0x31,0xc9, 0x0f,0xa2, 0x89,0xd8, 0xe7,0x81, 0x89,0xc8, 0xe7,0x82, 0xf4};
  memcpy(mem+0x2000,code,sizeof code);
  struct kvm_regs g={0}; g.rip=0x2000; g.rsp=0x8000; g.rflags=2; ioctl(vcpu,KVM_SET_REGS,&g);
  for(int k=0;k<2;k++){ if(ioctl(vcpu,KVM_RUN,0)<0){perror("run");break;}
    if(run->exit_reason==KVM_EXIT_IO){printf("%s guest sees leaf7 %s %08x\n",user?"CPL3":"CPL0",run->io.port==0x81?"ebx":"ecx",*(uint32_t*)((uint8_t*)run+run->io.data_offset));continue;}
    printf("exit %d\n",run->exit_reason);break;}
}
